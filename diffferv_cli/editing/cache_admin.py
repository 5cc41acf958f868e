"""Looking after the inversion cache (`editing/cache.py`): what it holds, removing entries, and
cleaning up after interrupted writes. `diffferv cache` is the front end.

What counts as an entry: a folder of the cache root whose name is a key (24 hex digits, `request_key`).
Anything else in the root is not diffferv's and is never touched, so a `--cache-dir` pointed at the
wrong folder cannot lose anyone's files.

Removing respects the per-entry lock that an inversion holds while it writes (`cache.entry_lock`, the
file `<root>/.locks/<key>.lock`): an entry whose lock another process holds is skipped and reported,
never deleted under it. A removal first renames the entry to `<root>/.<key>.removing` (one atomic step:
the entry is gone for every reader at once), then deletes that folder; `clean` finishes a removal that
was interrupted. The lock files themselves stay (deleting a lock file that another process may be
about to open would let two processes hold "the" lock at once); they are empty.

"Last use" is the newest modification time of the entry's files: when it was written, which is when an
inversion (or a resumed one) last ran. Reading an entry for an edit does not change it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from diffferv_cli.editing.cache import FORMAT_VERSION
from diffferv_cli.errors import UserError

KEY = re.compile(r"^[0-9a-f]{24}$")
TEMPORARY = re.compile(r"^\..+\.partial(\.[^.]*)?$")  # files.atomic_path: .<stem>.<random>.partial<suffix>
REMOVING = ".removing"
MANIFEST = "manifest.json"
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class EntryInfo:
    """One cache entry as `diffferv cache list` shows it. Fields the manifest lacks (or holds with the
    wrong type) are None; `problem` says why a broken entry is never reused."""

    key: str
    folder: Path
    size: int  # bytes, every file of the folder
    last_used: float  # seconds since the epoch: the newest mtime of the folder's files
    clip: str | None = None
    model: str | None = None
    prompt: str | None = None
    steps: int | None = None
    finished_steps: int | None = None
    frames: int | None = None
    working_size: tuple[int, int] | None = None
    features_stored: bool = False
    problem: str | None = None

    @property
    def complete(self) -> bool:
        return self.problem is None and self.steps is not None and (self.finished_steps or 0) >= self.steps

    def to_json(self) -> dict:
        values = asdict(self)
        values.update(folder=str(self.folder), complete=self.complete,
                      working_size=list(self.working_size) if self.working_size else None)
        return values


def entry_folders(root: Path) -> list[Path]:
    """The entry folders of `root` (named like a key), sorted by name; none when `root` does not exist."""
    if not root.is_dir():
        return []
    return sorted(path for path in root.iterdir() if KEY.match(path.name) and path.is_dir() and not path.is_symlink())


def _files(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if path.is_file() and not path.is_symlink()]


def _typed(value, kind):
    """`value` when it has the type `kind` (a bool is not an int here), else None."""
    if kind is int and isinstance(value, bool):
        return None
    return value if isinstance(value, kind) else None


def read_entry(folder: Path) -> EntryInfo:
    """What `folder` holds; a missing or unreadable manifest makes a broken entry, never an exception."""
    sizes_and_times = []
    for path in _files(folder):
        try:
            info = path.stat()
        except OSError:  # removed while we look
            continue
        sizes_and_times.append((info.st_size, info.st_mtime))
    size = sum(size for size, _ in sizes_and_times)
    last_used = max((mtime for _, mtime in sizes_and_times), default=_mtime(folder))
    common = {"key": folder.name, "folder": folder, "size": size, "last_used": last_used}
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return EntryInfo(**common, problem="no manifest (an interrupted start; `diffferv cache clean` removes it)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        return EntryInfo(**common, problem=f"the manifest does not read ({err.__class__.__name__})")
    request = manifest.get("request") if isinstance(manifest, dict) else None
    if not isinstance(request, dict):
        return EntryInfo(**common, problem="the manifest has no request")
    source = manifest.get("source")
    working = request.get("working_size")
    selection = request.get("selection")
    indices = selection.get("indices") if isinstance(selection, dict) else None
    frames = _typed(manifest.get("frames"), int) or (len(indices) if isinstance(indices, list) else None)
    found = EntryInfo(
        **common,
        clip=_typed(source.get("path"), str) if isinstance(source, dict) else None,
        model=_typed(request.get("model"), str),
        prompt=_typed(request.get("prompt"), str),
        steps=_typed(request.get("steps"), int),
        finished_steps=_typed(manifest.get("finished_steps", -1), int),
        frames=frames,
        working_size=tuple(working) if isinstance(working, list) and len(working) == 2 and
        all(_typed(side, int) for side in working) else None,
        features_stored=manifest.get("features_stored") is True,
    )
    if manifest.get("format") != FORMAT_VERSION:
        return _with_problem(found, f"cache format {manifest.get('format')!r}, this diffferv reads "
                                    f"{FORMAT_VERSION} (never reused)")
    return found


def _with_problem(entry: EntryInfo, problem: str) -> EntryInfo:
    return EntryInfo(**{**entry.__dict__, "problem": problem})


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def list_entries(root: Path) -> list[EntryInfo]:
    """Every entry of the cache at `root`, most recently used first."""
    entries = [read_entry(folder) for folder in entry_folders(root)]
    return sorted(entries, key=lambda entry: (-entry.last_used, entry.key))


def select(entries: list[EntryInfo], keys: Iterable[str]) -> list[EntryInfo]:
    """The entries named by `keys`, each a key or a prefix that only one key starts with (in `keys` order,
    each once). An unknown or ambiguous key is a `UserError`."""
    chosen: dict[str, EntryInfo] = {}
    for wanted in keys:
        text = wanted.strip().lower()
        matches = [entry for entry in entries if entry.key.startswith(text)] if text else []
        if not matches:
            raise UserError(f"No cache entry has the key {wanted!r}; `diffferv cache list` shows the keys.")
        if len(matches) > 1 and not any(entry.key == text for entry in matches):
            shown = ", ".join(entry.key for entry in matches[:4]) + (", ..." if len(matches) > 4 else "")
            raise UserError(f"The key prefix {wanted!r} matches {len(matches)} cache entries ({shown}); give more "
                            "of the key.")
        entry = next((entry for entry in matches if entry.key == text), matches[0])
        chosen.setdefault(entry.key, entry)
    return list(chosen.values())


def parse_age(text: str) -> float:
    """Seconds in an age such as `30d`, `12h`, `90m`, `45s` (a number and one unit)."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", text)
    if found is None:
        raise UserError(f"--older-than takes a number and a unit s, m, h or d (for example 30d), not {text!r}.")
    return float(found.group(1)) * _UNITS[found.group(2)]


def unused_for(entries: list[EntryInfo], seconds: float, now: float | None = None) -> list[EntryInfo]:
    """The entries last used more than `seconds` before `now` (default: the current time)."""
    now = time.time() if now is None else now
    return [entry for entry in entries if now - entry.last_used > seconds]


@dataclass
class Removal:
    """What a removal did: entries removed, entries skipped because another process holds them, leftover
    files and folders removed by `clean`, and the bytes freed."""

    removed: list[EntryInfo] = field(default_factory=list)
    busy: list[EntryInfo] = field(default_factory=list)
    leftovers: list[Path] = field(default_factory=list)
    freed: int = 0


class _Busy(Exception):
    pass


def _hold(root: Path, key: str):
    """The entry's lock (the one `cache.entry_lock` takes), acquired without waiting; `_Busy` when another
    process holds it."""
    from filelock import FileLock, Timeout

    locks = root / ".locks"
    try:
        locks.mkdir(exist_ok=True)
        lock = FileLock(locks / f"{key}.lock")
        lock.acquire(timeout=0)
    except Timeout:
        raise _Busy from None
    except OSError as err:
        raise UserError(f"Cannot lock the cache entry {root / key} ({err.strerror}); is the cache folder "
                        "writable?") from None
    return lock


def _delete(root: Path, folder: Path) -> None:
    """Rename `folder` out of the way (the entry disappears at once), then delete it."""
    doomed = root / f".{folder.name}{REMOVING}"
    try:
        if doomed.exists():
            shutil.rmtree(doomed)
        os.replace(folder, doomed)
        shutil.rmtree(doomed)
    except OSError as err:
        raise UserError(f"Cannot remove the cache entry {folder} ({err.strerror}).") from None


def remove(root: Path, entries: Iterable[EntryInfo]) -> Removal:
    """Delete `entries`, each while holding its lock; an entry in use by another process is skipped."""
    done = Removal()
    for entry in entries:
        try:
            lock = _hold(root, entry.key)
        except _Busy:
            done.busy.append(entry)
            continue
        try:
            if entry.folder.exists():
                _delete(root, entry.folder)
        finally:
            lock.release()
        done.removed.append(entry)
        done.freed += entry.size
    return done


def clean(root: Path) -> Removal:
    """Remove what interrupted writes left behind, never a complete entry's data:

    * temporary files of atomic writes (`files.atomic_path`: `.<stem>.<random>.partial<suffix>`),
    * files that an entry's manifest does not name (written, then interrupted before the manifest
      named them, or dropped from it; they are never read),
    * entry folders without a manifest (an inversion interrupted before its first save),
    * `.<key>.removing` folders of an interrupted removal,
    * scratch folders (`.scratch/run-<host>-<pid>-*`: an edit's latents between steps) of runs of this
      machine that no longer run.

    Entries whose lock another process holds are skipped (their writer is at work); entries whose
    manifest does not read, or is of another format, keep their files (`rm` removes them whole)."""
    done = Removal()
    if not root.is_dir():
        return done
    for doomed in sorted(root.glob(f".*{REMOVING}")):
        if doomed.is_dir() and KEY.match(doomed.name[1:-len(REMOVING)]):
            done.freed += sum(path.stat().st_size for path in _files(doomed))
            shutil.rmtree(doomed)
            done.leftovers.append(doomed)
    from diffferv_cli.editing.stored import abandoned_scratch

    for doomed in abandoned_scratch(root):
        done.freed += sum(path.stat().st_size for path in _files(doomed))
        shutil.rmtree(doomed, ignore_errors=True)
        done.leftovers.append(doomed)
    for folder in entry_folders(root):
        try:
            lock = _hold(root, folder.name)
        except _Busy:
            done.busy.append(read_entry(folder))
            continue
        try:
            entry = read_entry(folder)
            if not (folder / MANIFEST).is_file():
                _delete(root, folder)
                done.removed.append(entry)
                done.freed += entry.size
                continue
            for path in _strays(folder, entry):
                size = path.stat().st_size
                path.unlink()
                done.leftovers.append(path)
                done.freed += size
        finally:
            lock.release()
    return done


def _strays(folder: Path, entry: EntryInfo) -> list[Path]:
    """The files of `folder` that are temporaries, or (for a readable manifest of this format) that the
    manifest does not name."""
    named: set[str] | None = None
    if entry.problem is None:
        files = json.loads((folder / MANIFEST).read_text(encoding="utf-8")).get("files")
        named = set(files) if isinstance(files, dict) else None
    strays = []
    for path in sorted(_files(folder)):
        relative = path.relative_to(folder).as_posix()
        if TEMPORARY.match(path.name) or (named is not None and relative != MANIFEST and relative not in named):
            strays.append(path)
    return strays


def total_size(entries: Iterable[EntryInfo]) -> int:
    return sum(entry.size for entry in entries)


def human_size(size: int) -> str:
    """`size` bytes as people read them: 0 B, 812 B, 3.1 MB, 12.4 GB (powers of 1000, like `ls --si`)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")
