"""Writing files so that a crash never leaves half of one, and reading user-named files defensively.

Writing (every file diffferv creates: cache, training checkpoints and JSON, evaluation JSON, videos):

* `atomic_path(path)` yields a temporary path in the destination folder (same file system; same suffix,
  so tools that choose a format by the file name, like ffmpeg, still do). When the block succeeds the
  file is flushed to disk, given the permissions a new file gets under the umask, and renamed over
  `path`; the folder is then synced so the rename survives a power cut. When the block fails the
  temporary file is removed and `path` is untouched. Temporary names are unique (two writers never share
  one) and start with a dot.
* `flush_files(paths)` makes files written with `durable=False` durable in one go (a group commit): one
  `syncfs(2)` of their file system where the C library has it (Linux), else an fsync per file and folder.
* `atomic_write_bytes`, `atomic_write_text`, `atomic_write_json` are the one-shot forms. JSON is written
  strictly: a NaN or infinity is a `ValueError`, never the invalid `NaN` token.

These raise `OSError` as the operating system reports it; callers turn that into a sentence.

Outputs named by the user (videos, reports, JSON) are checked before any work (`check_output_target`: the
suffix, an existing writable folder, never an input nor a link or hard link to one, never a device or
folder, an existing file only with --overwrite) and claimed for the command (`claim_outputs`: an OS lock
per target in a per-user folder of the temporary directory, released when the command ends, however it
ends). A second command writing the same file is refused while the first runs, and the first claim of a
target removes the `.partial` files that killed runs left beside it (`remove_leftovers`).

Reading: `input_status` stats a user-named input and says why it cannot be had (missing, a link loop, a
folder on the way without search permission); `read_small_file` refuses what is not a regular file (a FIFO or `/dev/zero` would block or never
end) and what is larger than a limit, before reading. `open_image` checks an image's pixel count from its
header against PIL's decompression-bomb limit before any pixel is decoded.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import stat
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from diffferv_cli.errors import UserError, os_error_message, os_errors


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_folder(folder: Path) -> None:
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:  # some systems cannot open folders; the rename itself is still atomic
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


@contextlib.contextmanager
def atomic_path(path: Path | str, mode: int | None = None, *, durable: bool = True) -> Iterator[Path]:
    """A temporary path beside `path`, renamed over it when the block succeeds (see the module notes).

    `mode`: the new file's permission bits (default 0o666 less the umask, as `open()` would give).
    `durable=False` skips the fsyncs: still atomic for readers and after a killed process, not after a
    power cut (for a file rewritten every step whose durable copy follows later)."""
    path = Path(path)
    handle, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".partial" + path.suffix, dir=path.parent)
    os.close(handle)
    temp = Path(name)
    try:
        yield temp
        if durable:
            with open(temp, "rb") as written:
                os.fsync(written.fileno())
        os.chmod(temp, 0o666 & ~_umask() if mode is None else mode)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_folder(path.parent)


def flush_files(paths: list[Path]) -> None:
    """Make `paths` (files already renamed into place without fsync, on one file system) and their
    folder entries durable: one syncfs(2) where available, else one fsync per file and per folder."""
    if not paths:
        return
    if _syncfs(paths[0].parent):
        return
    for path in paths:
        with open(path, "rb") as written:
            os.fsync(written.fileno())
    for folder in sorted({path.parent for path in paths}):
        fsync_folder(folder)


def _syncfs(folder: Path) -> bool:
    """syncfs(2) on the file system holding `folder`; False where the C library lacks it or it fails."""
    function = _libc_syncfs()
    if function is None:
        return False
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return False
    try:
        return function(handle) == 0
    finally:
        os.close(handle)


@functools.cache
def _libc_syncfs():
    try:
        import ctypes

        return getattr(ctypes.CDLL(None, use_errno=True), "syncfs", None)
    except (OSError, ImportError):
        return None


def fsync_tree(folder: Path | str) -> None:
    """Flush every file under `folder`, then the folders themselves (before renaming the folder into place)."""
    folder = Path(folder)
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as written:
                os.fsync(written.fileno())
    for path in [*sorted(p for p in folder.rglob("*") if p.is_dir()), folder]:
        fsync_folder(path)


def atomic_write_bytes(path: Path | str, data: bytes, *, durable: bool = True) -> None:
    with atomic_path(path, durable=durable) as temp:
        temp.write_bytes(data)


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def to_json(value: Any, *, indent: int | None = 2, sort_keys: bool = False) -> str:
    """Strict JSON text: NaN and infinities raise ValueError instead of producing invalid JSON."""
    return json.dumps(value, indent=indent, sort_keys=sort_keys, allow_nan=False) + ("\n" if indent else "")


def atomic_write_json(path: Path | str, value: Any, *, sort_keys: bool = False) -> None:
    atomic_write_text(path, to_json(value, sort_keys=sort_keys))


# --------------------------------------------------------------------------------------------- reading


def read_small_file(path: Path | str, limit: int, what: str) -> bytes:
    """The bytes of `path`, a regular file of at most `limit` bytes; `what` names it in the error.

    Opened without blocking (a FIFO would wait for a writer forever) and checked with fstat before a
    byte is read, so a device such as /dev/zero or a FIFO is refused at once."""
    path = Path(path)
    try:
        handle = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise UserError(f"The {what} {path} does not exist.") from None
    except OSError as err:
        raise UserError(f"Cannot read the {what} {path} ({err.strerror}).") from None
    info = os.fstat(handle)
    if not stat.S_ISREG(info.st_mode):
        os.close(handle)
        if stat.S_ISDIR(info.st_mode):
            raise UserError(f"The {what} {path} is a folder, not a file.")
        raise UserError(f"The {what} {path} is not a regular file (a device, FIFO or socket).")
    with os.fdopen(handle, "rb") as file:
        if info.st_size > limit:
            raise UserError(f"The {what} {path} is {info.st_size} bytes; at most {limit} are accepted.")
        try:
            data = file.read(limit + 1)
        except OSError as err:
            raise UserError(f"Cannot read the {what} {path} ({err.strerror}).") from None
    if len(data) > limit:  # grew while being read
        raise UserError(f"The {what} {path} is larger than {limit} bytes.")
    return data


def open_image(source):
    """`PIL.Image.open(source)` that refuses, from the header alone, an image with more pixels than PIL's
    `Image.MAX_IMAGE_PIXELS` (a decompression bomb: a small file that decodes to gigabytes). Raises
    `PIL.Image.DecompressionBombError` for those; the caller decides whether that skips or stops."""
    from PIL import Image

    with warnings.catch_warnings():  # PIL warns between the limit and twice it; this refuses instead
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image = Image.open(source)  # reads the header only; PIL itself raises past twice the limit
    limit = Image.MAX_IMAGE_PIXELS
    if limit and image.width * image.height > limit:
        width, height = image.size
        image.close()
        raise Image.DecompressionBombError(
            f"{width}x{height} is {width * height} pixels, more than the {limit} allowed")
    return image


# --------------------------------------------------------------------------------------------- outputs


def input_status(path: Path | str, what: str = "input") -> os.stat_result:
    """`os.stat(path)`, or one sentence saying why the input cannot be had: missing (a dangling link
    too), a symbolic link loop, a folder on the way without search permission."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        raise UserError(f"{path} does not exist.") from None
    except OSError as err:
        raise UserError(os_error_message(err, f"read the {what}", path)) from None


def _same_file(first: os.stat_result, second: os.stat_result) -> bool:
    return (first.st_dev, first.st_ino) == (second.st_dev, second.st_ino)


def check_output_target(path: Path, inputs: list[Path] | tuple[Path, ...] = (), overwrite: bool = False,
                        suffixes: tuple[str, ...] | None = None, what: str = "output") -> None:
    """Refuse, before any work, an output `path` that cannot or must not be written: a suffix not in
    `suffixes` (any when None), an input or a symbolic or hard link to one (compared by device and inode),
    an existing folder, device, FIFO or socket (even with `overwrite`), an existing file without
    `overwrite`, a missing or unwritable folder."""
    path = Path(path)
    if path.name in ("", ".", ".."):
        raise UserError(f"The {what} {str(path) or repr('')} names no file; give a file name.")
    if suffixes is not None and path.suffix.lower() not in suffixes:
        listed = ", ".join(suffixes[:-1]) + " or " + suffixes[-1] if len(suffixes) > 1 else suffixes[0]
        raise UserError(f"The {what} {path} must end in {listed}.")
    folder = path.parent
    try:
        folder_info = os.stat(folder)
    except FileNotFoundError:
        raise UserError(f"The {what} folder {folder} does not exist.") from None
    except OSError as err:
        raise UserError(os_error_message(err, f"write in the {what} folder", folder)) from None
    if not stat.S_ISDIR(folder_info.st_mode):
        raise UserError(f"The {what} folder {folder} is not a folder.")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"The {what} folder {folder} is not writable; choose another -o.")
    try:
        target = os.stat(path)  # through links: where the bytes would go
    except FileNotFoundError:
        target = None
    except OSError as err:
        raise UserError(os_error_message(err, f"write the {what}", path)) from None
    for source in inputs:
        try:
            source_info = os.stat(source)
        except OSError:
            source_info = None
        if (target is not None and source_info is not None and _same_file(target, source_info)) or \
                Path(path).resolve() == Path(source).resolve():
            raise UserError(f"The {what} {path} is the input video {source} (or a link to it); choose another -o.")
    if os.path.lexists(path):
        if target is not None and stat.S_ISDIR(target.st_mode):
            raise UserError(f"The {what} {path} is a folder; give a file name such as {path / 'out.mp4'}.")
        if target is not None and not stat.S_ISREG(target.st_mode):
            raise UserError(f"The {what} {path} exists and is not a regular file (a device, FIFO or socket); "
                            "choose another -o.")
        if not overwrite:
            raise UserError(f"{path} already exists; pass --overwrite or another -o.")


def check_distinct_targets(paths: list[Path]) -> None:
    """Refuse two outputs of one command that are the same file (`-p age -p age`, two presets of one file
    name, a comparison named like another output): the second would replace the first."""
    seen: dict[str, Path] = {}
    for path in paths:
        key = _target_key(path)
        if key in seen:
            raise UserError(f"Two outputs of this command are the same file {path}; each edit needs its own name "
                            "(repeat no preset, or rename a preset file).")
        seen[key] = path


def _target_key(path: Path) -> str:
    """The identity of an output file to be: its folder resolved (links followed), and its name."""
    path = Path(path)
    return str(path.parent.resolve() / path.name)


def _claims_folder() -> Path:
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    return Path(tempfile.gettempdir()) / f"diffferv-{uid}" / "outputs"


_CLAIMS: dict[str, Any] = {}  # target key -> held lock, for this process until `release_outputs`


def claim_outputs(paths: list[Path]) -> None:
    """Hold every output of `paths` for this process, so that no other diffferv command writes it before
    `release_outputs` (the CLI calls it when a command ends): a second command on the same file is
    refused at once, never left to replace the first's. Then remove the leftovers of killed runs beside
    each (`remove_leftovers`): no live command is writing them. Claiming a file twice is fine."""
    from filelock import FileLock, Timeout

    if int(os.environ.get("RANK", "0") or 0) > 0:  # a torchrun follower writes nothing: rank 0 holds the outputs
        return
    folder = _claims_folder()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:  # no temporary folder to lock in: the checks still ran, only the claim is lost
        return
    for path in paths:
        key = _target_key(path)
        if key in _CLAIMS:
            continue
        lock = FileLock(folder / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.lock")
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise UserError(f"Another diffferv command is writing {path}; wait for it to finish or choose "
                            "another -o.") from None
        except OSError:
            continue
        _CLAIMS[key] = lock
        remove_leftovers(Path(path))


def release_outputs() -> None:
    """Let go of every output `claim_outputs` holds."""
    while _CLAIMS:
        _, lock = _CLAIMS.popitem()
        lock.release()


def leftovers(path: Path) -> list[Path]:
    """The temporary files a killed writer of `path` left beside it: `.<stem>.<8 random>.partial<suffix>`,
    the names `atomic_path` and the video writer give (never a file of another target)."""
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.stem)}\.[a-z0-9_]{{8}}\.partial{re.escape(path.suffix)}")
    try:
        names = os.listdir(path.parent)
    except OSError:
        return []
    return [path.parent / name for name in names if pattern.fullmatch(name)]


def remove_leftovers(path: Path) -> list[Path]:
    """Delete `leftovers(path)`; call it only while holding `path` (`claim_outputs`)."""
    removed = []
    for leftover in leftovers(path):
        with os_errors("remove the leftover", leftover):
            leftover.unlink(missing_ok=True)
        removed.append(leftover)
    return removed
