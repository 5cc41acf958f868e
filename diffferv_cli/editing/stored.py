"""Tensor files read and written a range of rows at a time, in the safetensors layout.

A step's latent of every frame and a clip's trajectory links grow with the clip: at 20,000 frames of
512x912 one latent is 2.3 GB. The step loops never hold one whole: `TensorFileWriter` lays out a file
whose tensors' shapes are known up front and takes their rows in any order (positioned writes), and
`TensorFile` reads any range of rows of a tensor. Memory is then set by the rows in hand, not by the
clip; the operating system's page cache keeps recently written steps close without counting as ours.

The bytes are exactly those `safetensors.torch.save` writes for the same tensors (one dtype per file,
tensors in name order, the JSON header padded with spaces to 8 bytes): a file written either way has
the same hash and is read by either (tests/test_stored.py).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import struct
import tempfile
import weakref
from pathlib import Path

import numpy as np
import torch

_CODES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}
_DTYPES = {code: dtype for dtype, code in _CODES.items()}
_HASH_BLOCK = 8 << 20


class TensorFileError(ValueError):
    """The file is not a tensor file this module can read ranges of (callers turn it into a sentence)."""


def _layout(specs: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """The header bytes (length prefix included) and each tensor's (begin, end) in the data section."""
    if len({dtype for dtype, _ in specs.values()}) > 1:
        raise ValueError("one dtype per tensor file")  # safetensors orders mixed dtypes by alignment
    meta, spans, offset = {}, {}, 0
    for name in sorted(specs):
        dtype, shape = specs[name]
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        meta[name] = {"dtype": _CODES[dtype], "shape": [int(side) for side in shape], "data_offsets": [offset, offset + size]}
        spans[name] = (offset, offset + size)
        offset += size
    text = json.dumps(meta, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, spans


def _row_bytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return math.prod(shape[1:]) * torch.empty((), dtype=dtype).element_size()


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read a block at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


class TensorFileWriter:
    """A tensor file of known tensors (name -> (dtype, shape)) at `path`, filled a range of rows at a time
    in any order (`write_rows`); `finish()` checks that every row was written and returns the file's
    sha256. The caller renames the file into place (the cache writes to a temporary name first)."""

    def __init__(self, path: Path, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]]):
        self.path = Path(path)
        self.specs = {name: (dtype, tuple(int(side) for side in shape)) for name, (dtype, shape) in specs.items()}
        header, self._spans = _layout(self.specs)
        self._data = len(header)
        self._written = {name: np.zeros(shape[0] if shape else 1, dtype=bool) for name, (_, shape) in self.specs.items()}
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.pwrite(self._fd, header, 0)
            os.ftruncate(self._fd, self._data + max((end for _, end in self._spans.values()), default=0))
        except BaseException:
            self.abort()
            raise

    def write_rows(self, name: str, start: int, rows: torch.Tensor) -> None:
        """Rows `start` .. `start + len(rows)` of tensor `name` (the rest of their shape as declared)."""
        dtype, shape = self.specs[name]
        if rows.dtype != dtype or tuple(rows.shape[1:]) != shape[1:] or not 0 <= start <= shape[0] - len(rows):
            raise ValueError(f"rows {start}..{start + len(rows)} of {name} {tuple(rows.shape)} {rows.dtype} do not "
                             f"fit {shape} {dtype}")
        data = rows.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes()
        os.pwrite(self._fd, data, self._data + self._spans[name][0] + start * _row_bytes(dtype, shape))
        self._written[name][start:start + len(rows)] = True

    def finish(self, *, durable: bool = False) -> str:
        """Close the file (flushed to the disk with `durable`) and return its sha256."""
        missing = [name for name, rows in self._written.items() if not rows.all()]
        if missing:
            self.abort()
            raise ValueError(f"{self.path.name}: rows of {missing[0]} were never written")
        try:
            if durable:
                os.fsync(self._fd)
        finally:
            os.close(self._fd)
            self._fd = -1
        return file_sha256(self.path)

    def abort(self) -> None:
        """Close and remove the unfinished file."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.path.unlink(missing_ok=True)


class TensorFile:
    """A tensor file opened for range reads: `rows(name, start, stop)`, `read(name)`. The header is
    checked against the file's size (a truncated or foreign file is a `TensorFileError`)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise TensorFileError("too short for a header")
            (length,) = struct.unpack("<Q", prefix)
            if length > min(size - 8, 100 << 20):
                raise TensorFileError("header longer than the file")
            try:
                meta = json.loads(handle.read(length))
            except ValueError as err:
                raise TensorFileError(f"header is not JSON ({err})") from None
        self._data = 8 + length
        self.tensors: dict[str, tuple[torch.dtype, tuple[int, ...], int]] = {}
        if not isinstance(meta, dict):
            raise TensorFileError("header is not a table")
        for name, info in meta.items():
            if name == "__metadata__":
                continue
            try:
                dtype, shape = _DTYPES[info["dtype"]], tuple(int(side) for side in info["shape"])
                begin, end = (int(offset) for offset in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise TensorFileError(f"tensor {name!r} is described oddly") from None
            if (min(shape, default=1) < 0 or end - begin != math.prod(shape) * torch.empty((), dtype=dtype).element_size()
                    or begin < 0 or self._data + end > size):
                raise TensorFileError(f"tensor {name!r} does not fit the file")
            self.tensors[name] = (dtype, shape, begin)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self.tensors[name][0]

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows `start` .. `stop` (clamped to the tensor) of tensor `name`, a new tensor."""
        dtype, shape, begin = self.tensors[name]
        start, stop = max(0, start), min(stop, shape[0])
        count = max(stop - start, 0)
        row = _row_bytes(dtype, shape)
        if not count:
            return torch.empty((0, *shape[1:]), dtype=dtype)
        data = bytearray(count * row)
        view, filled, offset = memoryview(data), 0, self._data + begin + start * row
        with open(self.path, "rb") as handle:
            while filled < len(data):  # one read returns at most ~2 GiB
                got = os.preadv(handle.fileno(), [view[filled:filled + (1 << 30)]], offset + filled)
                if not got:
                    raise TensorFileError("shorter than its header says")
                filled += got
        return torch.frombuffer(data, dtype=torch.uint8).view(dtype).reshape(count, *shape[1:])

    def read(self, name: str) -> torch.Tensor:
        return self.rows(name, 0, self.shape(name)[0] if self.shape(name) else 1).reshape(self.shape(name))


# Under the cache root: the run folders of `Scratch` (an edit's latent between steps).
SCRATCH_FOLDER = ".scratch"


def scratch_prefix(pid: int | None = None) -> str:
    """`run-<host>-<pid>-`: whose run a scratch folder is (`diffferv cache clean` removes those of runs of
    this machine that are gone)."""
    import socket

    return f"run-{socket.gethostname()}-{os.getpid() if pid is None else pid}-"


def abandoned_scratch(root: Path) -> list[Path]:
    """The scratch folders under the cache `root` left by runs of this machine that no longer run."""
    import re

    host = re.escape(scratch_prefix(0).removesuffix("0-"))
    found = []
    for folder in sorted((root / SCRATCH_FOLDER).glob("run-*")):
        match = re.match(rf"^{host}(\d+)-", folder.name)
        if not match or not folder.is_dir():
            continue
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            found.append(folder)
        except (PermissionError, OverflowError, ValueError):
            pass  # alive (another user's), or no process number at all
    return found


class Scratch:
    """A run's private folder for clip-sized intermediates (each edit's latent x between steps: a file
    written as the windows finish, read a window at a time by the next step). Removed by `close()`, or
    when the object is collected, or at exit; a killed run's folder is left for `diffferv cache clean`."""

    def __init__(self, parent: Path):
        from diffferv_cli.errors import os_errors

        with os_errors("create the scratch folder", parent, "pass --cache-dir"):
            parent.mkdir(parents=True, exist_ok=True)
            self.folder = Path(tempfile.mkdtemp(prefix=scratch_prefix(), dir=parent))
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.folder, ignore_errors=True)

    def latent(self, name: str, shape: tuple[int, ...]) -> TensorFileWriter:
        """A float32 latent `shape` written a range of frames at a time (`write_rows("latent", ...)`)."""
        from diffferv_cli.errors import os_errors

        with os_errors("write the scratch file", self.folder / name, "pass --cache-dir"):
            return TensorFileWriter(self.folder / f"{name}.safetensors", {"latent": (torch.float32, tuple(shape))})

    def write(self, writer: TensorFileWriter, start: int, rows) -> None:
        """Rows of a latent from `start`: a tensor, or a `prefetch.HostTensor` on its way to the host."""
        from diffferv_cli.errors import os_errors

        with os_errors("write the scratch file", writer.path, "pass --cache-dir"):
            writer.write_rows("latent", start, rows if isinstance(rows, torch.Tensor) else rows.get())

    def finish(self, writer: TensorFileWriter):
        """The written latent, for reading a range of frames at a time (`cache.LatentRows`)."""
        from diffferv_cli.editing.cache import LatentRows
        from diffferv_cli.errors import os_errors

        with os_errors("write the scratch file", writer.path, "pass --cache-dir"):
            writer.finish()
            return LatentRows(TensorFile(writer.path), writer.path.name)

    def remove(self, rows) -> None:
        """Delete a latent of this folder no longer needed."""
        path = getattr(getattr(rows, "stored", None), "path", None)
        if path is not None and path.parent == self.folder:
            path.unlink(missing_ok=True)

    def close(self) -> None:
        self._cleanup()
