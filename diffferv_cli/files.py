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

Reading: `read_small_file` refuses what is not a regular file (a FIFO or `/dev/zero` would block or never
end) and what is larger than a limit, before reading. `open_image` checks an image's pixel count from its
header against PIL's decompression-bomb limit before any pixel is decoded.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import stat
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from diffferv_cli.errors import UserError


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
