"""Content-addressed inversion cache ("cached DDIM inversion stored to disk").

One folder per (decoded frames, frame selection, working size, model, inversion settings):

    <root>/<key>/
        manifest.json                  format, request, sizes, timesteps, finished steps, file hashes
        trajectories.safetensors       per token grid: the clip's trajectory links (int32, temporal.ClipLinks)
        latents/step-000.safetensors   z_0 = VAE latent mean of the frames (float32, (m, 4, h, w));
                                       while the encode runs, its chunks latents/encoded-NNNNNN.safetensors
        latents/step-001.safetensors   z_1 ... z_T: the latent fed to the UNet at inversion step i is z_i
        features/step-000-w000.safetensors  disk feature mode only, per step and temporal window: Q,K of
                                       SWCFA and TTA, cross-attention maps

`<root>` is `--cache-dir`, else `$DIFFFERV_CACHE`, else `$XDG_CACHE_HOME/diffferv` (~/.cache/diffferv).

`--compile` is part of the key (`"compile": true`, only when set, so eager keys are unchanged): a compiled
UNet rounds differently (latents ~1e-6 apart on the tiny model), and an edit's bytes must not depend on
which mode happened to fill the cache. The device is not: CPU and GPU latents differ in their last bits
too, so same bytes means same command on the same kind of machine.

The key hashes the decoded, selected frames at working size (`frames_sha256`), not the input file: the
inversion depends on those pixels only, and they are hashed in the pass that counts them
(`video.read_clip`), whatever the size of the file (a multi-GB 4K clip of which 16 frames are used is not
read whole). A different decoder build that decodes other pixels gets another entry.

Nothing here holds a whole clip's tensors: a step's latent is written a range of frames at a time as the
step loop finishes them (`latent_writer`) and read a window at a time (`latent_rows`), the trajectory
links likewise (`trajectory_writer`, `trajectory_rows`), in the layout `safetensors` writes
(editing/stored.py), each file's hash checked a block at a time once per process.

Every write goes to a temporary file in the same folder and is renamed into place (`files.atomic_path`),
and the manifest is rewritten after each finished step, so an interrupted inversion resumes from its
last finished step. Step files are flushed to the disk in group commits (`make_durable`: the files
written since the last commit, their folders, then the manifest naming them, with `durable_steps`),
every few seconds and at the end, not twice per step; a resume first checks the hashes of the steps
after `durable_steps` (those a power cut may have lost) and goes back to the last one that holds. A folder whose manifest does not describe the request, whose files fail their hash,
or whose tensors hold NaN or infinity is never used: the user gets one sentence and `--force`
recomputes. The same holds for values that do not fit together (`check_manifest`: frame count, latent
size, timesteps and step counts against the request and the files it names; `_check_tensors`: every
tensor file's names, dtypes and shapes against the manifest), so a hand-edited manifest or a file
swapped with its hash updated is refused before use, never met as an IndexError deep in a step loop.
A failure of the operating system (disk full, `ulimit -f`, read-only, permissions, a link loop) is one
sentence naming the file and whether it was being read or written.

One run at a time writes an entry: `entry_lock` holds `<root>/.locks/<key>.lock` (an OS file lock,
released when the process ends, however it ends) while an inversion runs; a second run on the same
entry says that it waits, waits, then finds the entry finished and reuses it. A finished entry on a disk
this process may not write (read-only, another user's shared cache) is still used, unlocked: nothing is
written to it, and `--force` on it says that it cannot be removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from safetensors import SafetensorError
from safetensors.torch import save

from diffferv_cli.editing.stored import TensorFile, TensorFileError, TensorFileWriter, file_sha256
from diffferv_cli.errors import UserError, os_error_message, os_errors
from diffferv_cli.files import _umask, atomic_write_bytes, flush_files, to_json

log = logging.getLogger("diffferv")

FORMAT_VERSION = 3  # 2: TTA replaces the SWCFA output (Q = K = V = h); 3: temporal windows, links stored
ENV_VAR = "DIFFFERV_CACHE"
WRITE_HINT = "pass --cache-dir to use another folder"


def cache_root(cache_dir: Path | str | None = None) -> Path:
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "diffferv"


class FramesDigest:
    """`frames_sha256` fed a frame (or a few) at a time, the frames' shape known up front."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype = np.dtype(np.uint8)):
        self._digest = hashlib.sha256(f"{np.dtype(dtype).str}{tuple(shape)}".encode())

    def update(self, frames: np.ndarray) -> None:
        self._digest.update(memoryview(np.ascontiguousarray(frames)).cast("B"))

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def frames_sha256(frames) -> str:
    """sha256 of decoded frames: their shape, dtype and pixels (what the inversion is computed from).
    Streamed working frames (`video.io.WorkingFrames`) carry it from the pass that counted them."""
    if getattr(frames, "sha256", None):
        return frames.sha256
    from diffferv_cli.video.io import frame_chunks

    digest = FramesDigest(tuple(frames.shape), frames.dtype)
    for _, chunk in frame_chunks(frames):
        digest.update(chunk)
    return digest.hexdigest()


def request_key(request: dict[str, Any]) -> str:
    """Stable hash of everything that determines the inversion's result."""
    canonical = json.dumps({"format": FORMAT_VERSION, **request}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:24]


@contextlib.contextmanager
def entry_lock(root: Path, request: dict[str, Any]) -> Iterator[None]:
    """Hold the entry of `request` for this process; waits (saying so once) while another run holds it."""
    from filelock import FileLock, Timeout

    locks = root / ".locks"
    key = request_key(request)
    try:
        locks.mkdir(parents=True, exist_ok=True)
        writable = os.access(locks, os.W_OK)
    except OSError as err:
        writable, failure = False, err
    else:
        failure = None
    if not writable:
        if _finished_on_disk(root / key):  # read it as it is: nothing will be written
            yield
            return
        if failure is not None:
            with os_errors("create the cache folder", root, "pass --cache-dir"):
                raise failure
        raise UserError(f"The cache folder {root} is not writable; pass --cache-dir.")
    lock = FileLock(locks / f"{key}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.warning("Another diffferv run is working on the cache entry %s; waiting for it to finish.", root / key)
        lock.acquire()
    except OSError as err:  # Timeout is one too
        raise UserError(os_error_message(err, "lock the cache entry", locks / f"{key}.lock", WRITE_HINT)) from None
    try:
        yield
    finally:
        lock.release()


def _finished_on_disk(folder: Path) -> bool:
    """Whether `folder` holds a finished inversion by its manifest (read only; anything odd is False, and
    `open_entry` then says what is wrong)."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        request = manifest["request"]
        return bool(manifest.get("encoded")) and int(manifest.get("finished_steps", -1)) >= int(request["steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


class _ManifestShape(BaseModel):
    """The types of the manifest fields this module reads (a hand-edited manifest is caught here)."""

    model_config = ConfigDict(extra="allow", strict=True)

    format: int
    request: dict
    finished_steps: int = -1
    feature_steps: int = Field(0, ge=0)
    durable_steps: int = Field(0, ge=0)  # group commits (inversion.StepCommits)
    durable_feature_steps: int = Field(0, ge=0)
    encoded: bool = False
    features_stored: bool = False
    files: dict[str, str] = {}
    # absent until the step that writes them; never null
    frames: int = Field(None, ge=1)
    latent_size: list[int] = Field(None, min_length=2, max_length=2)
    latent_channels: int = Field(None, ge=1)  # written with z_0 (absent in entries from before it)
    timesteps: list[int] = None

    @model_validator(mode="after")
    def _written_together(self) -> _ManifestShape:
        if "trajectories.safetensors" in self.files and (self.frames is None or self.latent_size is None):
            raise ValueError("trajectories without frames and latent size")
        if self.finished_steps > 0 and self.timesteps is None:
            raise ValueError("finished steps without timesteps")
        return self


@dataclass
class CacheEntry:
    """One inversion's folder. `manifest` mirrors manifest.json."""

    folder: Path
    manifest: dict[str, Any] = field(default_factory=dict)
    _shapes: dict = field(default_factory=dict, repr=False)  # what the files read so far agreed on
    _verified: set = field(default_factory=set, repr=False)  # (file, hash, size, mtime, inode) hashed in this process

    # -- manifest ----------------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.folder / "manifest.json"

    @property
    def steps(self) -> int:
        return int(self.manifest["request"]["steps"])

    @property
    def finished_steps(self) -> int:
        """Number of inversion steps whose output latent (and features, in disk mode) are on disk."""
        return int(self.manifest.get("finished_steps", -1))

    @property
    def complete(self) -> bool:
        return self.manifest.get("encoded", False) and self.finished_steps >= self.steps

    @property
    def has_features(self) -> bool:
        return bool(self.manifest.get("features_stored", False))

    def save_manifest(self, *, durable: bool = True) -> None:
        """Replace manifest.json atomically. The inversion loop saves it after every step with
        `durable=False` and durably with each group commit (`make_durable`) and at the end."""
        self.manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        with os_errors("write the cache file", self.manifest_path, WRITE_HINT):
            atomic_write_bytes(self.manifest_path, to_json(self.manifest, sort_keys=True).encode(), durable=durable)

    # -- tensors -----------------------------------------------------------------------------------
    def _write_tensors(self, relative: str, tensors: dict[str, torch.Tensor], *, durable: bool = True) -> None:
        data = save({name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()})
        with os_errors("write the cache file", self.folder / relative, WRITE_HINT):
            (self.folder / relative).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.folder / relative, data, durable=durable)
        self.manifest.setdefault("files", {})[relative] = hashlib.sha256(data).hexdigest()

    def holds(self, relative: str) -> bool:
        """Whether `relative` is on disk with the content the manifest names (its hash), without raising."""
        try:
            self._verified_path(relative)
        except (UserError, OSError):
            return False
        return True

    def _verified_path(self, relative: str, expected: str | None = None) -> Path:
        """The path of `relative`, its content checked against the manifest's hash (or `expected`) a block
        at a time (once per process while the file is unchanged); UserError when missing or changed."""
        path = self.folder / relative
        expected = expected or self.manifest.get("files", {}).get(relative)
        if expected is None or not path.is_file():
            raise UserError(f"The cache at {self.folder} is missing {relative}; rerun with --force to recompute it.")
        with os_errors("read the cache file", path, "rerun with --force, or pass --cache-dir"):
            stat = path.stat()
            stamp = (relative, expected, stat.st_size, stat.st_mtime_ns, stat.st_ino)
            if stamp not in self._verified:
                if file_sha256(path) != expected:
                    raise UserError(f"The cache file {path} is corrupted (hash mismatch); rerun with --force to "
                                    "recompute it.")
                self._verified.add(stamp)
        return path

    def _tensor_file(self, relative: str, expected: str | None = None) -> TensorFile:
        """`relative` opened for range reads (`stored.TensorFile`), its hash checked."""
        path = self._verified_path(relative, expected)
        with os_errors("read the cache file", path, "rerun with --force, or pass --cache-dir"):
            try:
                return TensorFile(path)
            except TensorFileError as err:
                raise UserError(f"The cache file {path} cannot be read ({err}); rerun with --force.") from None

    def _tensor_writer(self, relative: str, specs: dict) -> TensorWriter:
        """A file of the tensors `specs` (name -> (dtype, shape)) at `relative`, filled a range of rows at a
        time; named in the manifest (with its hash) once `finish`ed."""
        path = self.folder / relative
        with os_errors("write the cache file", path, WRITE_HINT):
            path.parent.mkdir(parents=True, exist_ok=True)
            handle, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".partial" + path.suffix, dir=path.parent)
            os.close(handle)
            try:
                writer = TensorFileWriter(Path(name), specs)
            except BaseException:
                Path(name).unlink(missing_ok=True)
                raise
        return TensorWriter(self, relative, writer)

    def latent_rows(self, index: int, sha256: str | None = None) -> LatentRows:
        """Latent `index` (z_0 .. z_T) for reading a range of frames at a time (`LatentRows`), the file's
        hash (the manifest's, or `sha256` for a file this run wrote and the manifest names later), names,
        dtype and shape checked first."""
        relative = self.latent_name(index)
        stored = self._tensor_file(relative, sha256)
        if set(stored.tensors) != {"latent"}:
            raise self._unfit(relative, f"tensors {sorted(stored.tensors)}, expected ['latent']")
        shape_only = {"latent": torch.empty(stored.shape("latent"), dtype=stored.dtype("latent"), device="meta")}
        self._checked_latent(relative, shape_only, self.manifest.get("frames"))
        return LatentRows(stored, relative)

    def latent_writer(self, index: int, shape: tuple[int, ...]) -> TensorWriter:
        """Latent `index` (float32 `shape`, (m, channels, h, w)) written a range of frames at a time."""
        return self._tensor_writer(self.latent_name(index), {"latent": (torch.float32, tuple(shape))})

    def make_durable(self, relatives: list[str]) -> None:
        """Flush the files `relatives` (written with `durable=False`) and their folders to the disk, then
        save the manifest durably: one group commit for the steps written since the last one."""
        with os_errors("write the cache entry", self.folder, WRITE_HINT):
            flush_files([self.folder / relative for relative in relatives])
        self.save_manifest(durable=True)

    def _verified_bytes(self, relative: str) -> bytes:
        """The bytes of `relative`, checked against the manifest's hash (UserError when missing or changed)."""
        path = self.folder / relative
        expected = self.manifest.get("files", {}).get(relative)
        if expected is None or not path.is_file():
            raise UserError(f"The cache at {self.folder} is missing {relative}; rerun with --force to recompute it.")
        with os_errors("read the cache file", path, "rerun with --force, or pass --cache-dir"):
            data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != expected:
            raise UserError(f"The cache file {path} is corrupted (hash mismatch); rerun with --force to recompute it.")
        return data

    def _read_tensors(self, relative: str) -> dict[str, torch.Tensor]:
        path = self.folder / relative
        data = self._verified_bytes(relative)
        try:
            from safetensors.torch import load

            tensors = load(data)
        except (SafetensorError, ValueError, RuntimeError) as err:
            raise UserError(f"The cache file {path} cannot be read ({err}); rerun with --force.") from err
        for name, tensor in tensors.items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise UserError(f"The cache file {path} holds NaN or infinite values ({name}); rerun with --force "
                                "to recompute it.")
        return tensors

    def _unfit(self, relative: str, what: str) -> UserError:
        return UserError(f"The cache file {self.folder / relative} does not fit its entry ({what}); rerun with "
                         "--force to recompute it.")

    def _checked_latent(self, relative: str, tensors: dict[str, torch.Tensor], frames: int | None) -> torch.Tensor:
        """The one float32 tensor `latent` of `relative`, (frames, channels, h, w) with the manifest's
        latent size and the channels of every other latent of this entry."""
        latent = tensors.get("latent")
        if set(tensors) != {"latent"} or latent is None:
            raise self._unfit(relative, f"tensors {sorted(tensors)}, expected ['latent']")
        height, width = self.manifest.get("latent_size") or (None, None)
        channels = self.manifest.get("latent_channels") or self._shapes.get("channels")
        if (latent.dtype != torch.float32 or latent.dim() != 4 or latent.shape[1] < 1
                or (frames is not None and latent.shape[0] != frames)
                or (height is not None and tuple(latent.shape[2:]) != (height, width))
                or (channels is not None and latent.shape[1] != channels)):
            want = f"({frames if frames is not None else 'n'}, {channels or 'c'}, {height}, {width}) float32"
            raise self._unfit(relative, f"latent {str(latent.dtype).removeprefix('torch.')} {tuple(latent.shape)}, "
                              f"expected {want}")
        self._shapes["channels"] = int(latent.shape[1])
        return latent

    def latent_name(self, index: int) -> str:
        return f"latents/step-{index:03d}.safetensors"

    def feature_name(self, step: int, window: int = 0) -> str:
        return f"features/step-{step:03d}-w{window:03d}.safetensors"

    def write_latent(self, index: int, latent: torch.Tensor, *, durable: bool = True) -> None:
        if not bool(torch.isfinite(latent).all()):
            raise UserError(f"The inversion produced NaN or infinite latents at step {index} (the model's "
                            f"dtype {self.manifest['request'].get('unet_dtype')} may overflow); try --dtype fp32.")
        self._write_tensors(self.latent_name(index), {"latent": latent.float()}, durable=durable)
        if index == 0 and latent.dim() == 4:
            self.manifest["latent_channels"] = int(latent.shape[1])  # what every latent of the entry has

    def read_latent(self, index: int) -> torch.Tensor:
        relative = self.latent_name(index)
        return self._checked_latent(relative, self._read_tensors(relative), self.manifest.get("frames"))

    def encoded_name(self, start: int) -> str:
        """A chunk of z_0 while the VAE encode is under way, from frame `start` (dropped once z_0 is written)."""
        return f"latents/encoded-{start:06d}.safetensors"

    def write_encoded(self, start: int, latents: torch.Tensor, *, durable: bool = True) -> None:
        self._write_tensors(self.encoded_name(start), {"latent": latents.float()}, durable=durable)

    def read_encoded(self, start: int) -> torch.Tensor:
        relative = self.encoded_name(start)
        return self._checked_latent(relative, self._read_tensors(relative), None)

    def drop(self, relatives: list[str]) -> None:
        """Take `relatives` out of the manifest, save it (durably), then delete their files: a file that
        the manifest does not name is never read, so a crash in between leaves a stray file, no damage."""
        for relative in relatives:
            self.manifest.get("files", {}).pop(relative, None)
        self.save_manifest()
        for relative in relatives:
            with os_errors("remove the cache file", self.folder / relative, WRITE_HINT):
                (self.folder / relative).unlink(missing_ok=True)

    def write_features(self, step: int, features: dict[str, torch.Tensor], window: int = 0, *,
                       durable: bool = True) -> None:
        self._write_tensors(self.feature_name(step, window), features, durable=durable)

    def read_features(self, step: int, window: int = 0) -> dict[str, torch.Tensor]:
        """Step `step`'s features of window `window`: the same names and shapes in every step of a window,
        each (window frames, heads, tokens, channels)."""
        relative = self.feature_name(step, window)
        tensors = self._read_tensors(relative)
        from diffferv_cli.temporal.windows import schedule_from_json

        windows = schedule_from_json(self.manifest["request"].get("windows", []))
        if windows and not 0 <= window < len(windows):
            raise self._unfit(relative, f"window {window} of {len(windows)}")
        frames = windows[window].frames if windows else None
        shapes = {name: (tuple(tensor.shape), tensor.dtype) for name, tensor in tensors.items()}
        tokens = {height * width for height, width in self._grids()} if self.manifest.get("latent_size") else None
        odd = [name for name, (shape, _) in shapes.items()
               if frames is not None and (len(shape) != 4 or shape[0] != frames or 0 in shape
                                          or (tokens is not None and shape[2] not in tokens))]
        if not tensors or odd:
            raise self._unfit(relative, f"{odd[0]} is {shapes[odd[0]][0]}, expected ({frames}, heads, tokens of a "
                              "token grid, channels)" if odd else "no features")
        first, seen = self._shapes.setdefault(("features", window), (relative, shapes))
        if seen != shapes:
            missing, extra = sorted(set(seen) - set(shapes)), sorted(set(shapes) - set(seen))
            changed = [name for name in set(seen) & set(shapes) if seen[name] != shapes[name]]
            what = (f"it lacks {missing[0]}" if missing else f"it has an unexpected {extra[0]}" if extra else
                    f"its {changed[0]} is {shapes[changed[0]][0]}")
            raise self._unfit(relative, f"{what}, unlike {first}")
        return tensors

    def _grids(self) -> set[tuple[int, int]]:
        """Every token grid an SD-family UNet has on this entry's latents: the latent size, then halved
        rounding up, three times (temporal.trajectories.token_grids)."""
        height, width = self.manifest["latent_size"]
        grids = set()
        for _ in range(4):
            grids.add((height, width))
            height, width = (height + 1) // 2, (width + 1) // 2
        return grids

    def write_trajectories(self, tensors: dict[str, torch.Tensor]) -> None:
        self._write_tensors("trajectories.safetensors", tensors)

    def trajectory_writer(self, grids, frames: int) -> TensorWriter:
        """trajectories.safetensors for a clip of `frames` frames on the token grids `grids`, written a
        range of frame pairs at a time (`write(name, start, links)`, names `link_name`)."""
        return self._tensor_writer("trajectories.safetensors", {
            link_name(grid): (torch.int32, (max(frames - 1, 0), grid[0] * grid[1])) for grid in grids})

    def trajectory_rows(self) -> TrajectoryRows:
        """The links of every token grid (`read_trajectories`), read a range of frame pairs at a time."""
        relative = "trajectories.safetensors"
        stored = self._tensor_file(relative)
        shapes = {name: torch.empty(stored.shape(name), dtype=stored.dtype(name), device="meta")
                  for name in stored.tensors}
        self._check_links(relative, shapes, values=False)
        return TrajectoryRows(self, stored)

    def _check_links(self, relative: str, tensors: dict[str, torch.Tensor], *, values: bool = True) -> None:
        frames, grids = int(self.manifest["frames"]), self._grids()
        for name, links in tensors.items():
            try:
                grid = tuple(int(part) for part in name.removesuffix(".links").split("x"))
            except ValueError:
                grid = None
            if not name.endswith(".links") or grid not in grids:
                raise self._unfit(relative, f"{name!r} names no token grid of a {self.manifest['latent_size']} latent")
            tokens = grid[0] * grid[1]
            if links.dtype != torch.int32 or tuple(links.shape) != (max(frames - 1, 0), tokens):
                raise self._unfit(relative, f"{name} is {str(links.dtype).removeprefix('torch.')} "
                                  f"{tuple(links.shape)}, expected int32 {(max(frames - 1, 0), tokens)}")
            if values and links.numel() and (int(links.min()) < -1 or int(links.max()) >= tokens):
                raise self._unfit(relative, f"{name} links to tokens outside its {grid[0]}x{grid[1]} grid")
        if not tensors and self.manifest["request"].get("temporal", {}).get("tta", True):
            raise self._unfit(relative, "no token grid")

    def read_trajectories(self) -> dict[str, torch.Tensor]:
        """The links of every token grid: `<h>x<w>.links`, int32 (frames - 1, h*w), each -1 or a token of
        its grid, on grids of the latent size halved (temporal.trajectories.token_grids)."""
        relative = "trajectories.safetensors"
        tensors = self._read_tensors(relative)
        self._check_links(relative, tensors)
        return tensors

    def disk_bytes(self) -> int:
        with os_errors("read the cache folder", self.folder):
            return sum(path.stat().st_size for path in self.folder.rglob("*") if path.is_file())


def open_entry(root: Path, request: dict[str, Any], *, force: bool = False) -> CacheEntry:
    """The cache folder for `request`: existing and matching, or new (also when `force`).

    Call it inside `entry_lock(root, request)` when the entry may be written."""
    key = request_key(request)
    folder = root / key
    entry = CacheEntry(folder)
    if force:
        with os_errors("remove the cache entry", folder, WRITE_HINT):
            if folder.is_symlink():  # the link goes, never what it points to
                folder.unlink()
            elif folder.exists():
                shutil.rmtree(folder)
    if os.path.lexists(entry.manifest_path) and not entry.manifest_path.is_file():
        raise UserError(f"The cache manifest {entry.manifest_path} is not a file; rerun with --force to recompute.")
    if entry.manifest_path.is_file():
        with os_errors("read the cache manifest", entry.manifest_path, "rerun with --force, or pass --cache-dir"):
            text = entry.manifest_path.read_bytes()
        try:
            manifest = json.loads(text)
            _ManifestShape.model_validate(manifest)
        except (ValueError, ValidationError) as err:
            raise UserError(f"The cache manifest {entry.manifest_path} is broken ({err.__class__.__name__}); "
                            "rerun with --force to recompute.") from None
        if manifest.get("format") != FORMAT_VERSION or manifest.get("request") != _jsonable(request):
            raise UserError(f"The cache at {folder} does not match this request; rerun with --force to recompute.")
        problem = manifest_problem(manifest)
        if problem:
            raise UserError(f"The cache manifest {entry.manifest_path} is inconsistent ({problem}); rerun with "
                            "--force to recompute.")
        entry.manifest = manifest
        return entry
    with os_errors("create the cache folder", folder, WRITE_HINT):
        folder.mkdir(parents=True, exist_ok=True)
    if not os.access(folder, os.W_OK):
        raise UserError(f"The cache folder {folder} is not writable; pass --cache-dir.")
    entry.manifest = {"format": FORMAT_VERSION, "key": key, "request": _jsonable(request),
                      "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "finished_steps": -1, "files": {}}
    entry.save_manifest()
    return entry


def manifest_problem(manifest: dict[str, Any]) -> str | None:
    """What does not fit together in a manifest whose types are right and whose request is this run's
    (so trusted), in words; None when it all fits. Counts against the request, the latent size against
    the working size, the finished steps against the files named."""
    request = manifest["request"]
    steps = int(request.get("steps", 0))
    selected = len(request.get("selection", {}).get("indices", ())) or None
    files = manifest.get("files", {})
    if any(not isinstance(digest, str) or len(digest) != 64 for digest in files.values()):
        return "a file hash that is not a sha256"
    frames, size, timesteps = manifest.get("frames"), manifest.get("latent_size"), manifest.get("timesteps")
    if frames is not None and selected is not None and frames != selected:
        return f"frames {frames}, but the request selects {selected}"
    if size is not None and "working_size" in request:
        width, height = request["working_size"]
        if min(size) < 1 or height % size[0] or width % size[1] or height // size[0] != width // size[1]:
            return f"latent size {size} for frames of {width}x{height}"
    if timesteps is not None and (len(timesteps) != steps or timesteps != sorted(set(timesteps))
                                  or timesteps[0] < 0):
        return f"{len(timesteps)} timesteps for {steps} steps"
    finished = manifest.get("finished_steps", -1)
    if not -1 <= finished <= steps:
        return f"finished steps {finished} of {steps}"
    if manifest.get("feature_steps", 0) > steps:
        return f"feature steps {manifest['feature_steps']} of {steps}"
    encoded = manifest.get("encoded_frames")
    if encoded is not None and (not isinstance(encoded, int) or not 0 <= encoded <= (selected or encoded)):
        return f"encoded frames {encoded} of {selected}"
    if manifest.get("encoded") and (frames is None or size is None):
        return "encoded without frame count or latent size"
    if finished >= 0 and not manifest.get("encoded"):
        return "finished steps without the encoded frames"
    for step in range(max(finished, -1) + 1):
        name = f"latents/step-{step:03d}.safetensors"
        if name not in files:
            return f"step {step} is finished but {name} is not listed"
    return None


def _jsonable(value: Any) -> Any:
    """`value` as manifest.json gives it back (tuples as lists), to compare with a loaded manifest."""
    return json.loads(json.dumps(value))


def link_name(grid: tuple[int, int]) -> str:
    return f"{grid[0]}x{grid[1]}.links"


def links_to_tensors(clip_links) -> dict[str, torch.Tensor]:
    return {link_name(grid): links.to(torch.int32) for grid, links in clip_links.links.items()}


def links_from_tensors(tensors: dict[str, torch.Tensor], frames: int):
    from diffferv_cli.temporal.trajectories import ClipLinks

    links = {}
    for name, grid_links in tensors.items():
        height, width = (int(part) for part in name.removesuffix(".links").split("x"))
        links[(height, width)] = grid_links.to(torch.int32).reshape(frames - 1, height * width)
    return ClipLinks(frames, links)


class LatentRows:
    """A cached latent (m, channels, h, w) read a range of frames at a time: `rows(start, stop)`, or a
    slice, each a float32 tensor checked to be finite. `read()` is the whole latent."""

    def __init__(self, stored: TensorFile, relative: str):
        self.stored, self.relative = stored, relative

    @property
    def shape(self) -> tuple[int, ...]:
        return self.stored.shape("latent")

    def __len__(self) -> int:
        return self.shape[0]

    def rows(self, start: int, stop: int) -> torch.Tensor:
        with os_errors("read the cache file", self.stored.path, "rerun with --force, or pass --cache-dir"):
            try:
                latent = self.stored.rows("latent", start, stop)
            except TensorFileError as err:
                raise UserError(f"The cache file {self.stored.path} cannot be read ({err}); rerun with --force.") from None
        if not bool(torch.isfinite(latent).all()):
            raise UserError(f"The cache file {self.stored.path} holds NaN or infinite values (latent); rerun with "
                            "--force to recompute it.")
        return latent

    def __getitem__(self, key: slice) -> torch.Tensor:
        start, stop, step = key.indices(len(self))
        if step != 1:
            raise ValueError("latent rows are read as contiguous ranges")
        return self.rows(start, stop)

    def read(self) -> torch.Tensor:
        return self.rows(0, len(self))


class TensorWriter:
    """A cache file being written a range of rows at a time (`write`, any order); `finish` renames it into
    place and names it in the manifest with its hash (the caller saves the manifest); `abort` drops it."""

    def __init__(self, entry: CacheEntry, relative: str, writer: TensorFileWriter):
        self.entry, self.relative, self.writer = entry, relative, writer

    def write(self, name: str, start: int, rows: torch.Tensor) -> None:
        if rows.is_floating_point() and not bool(torch.isfinite(rows).all()):
            raise UserError(f"The inversion produced NaN or infinite values in {self.relative} (the model's dtype "
                            f"{self.entry.manifest['request'].get('unet_dtype')} may overflow); try --dtype fp32.")
        with os_errors("write the cache file", self.entry.folder / self.relative, WRITE_HINT):
            self.writer.write_rows(name, start, rows)

    def finish(self, *, durable: bool = False, record: bool = True) -> str:
        """Rename the file into place and return its sha256; with `record`, name it in the manifest (a
        step loop leaves that to its writer thread, which alone changes the manifest meanwhile)."""
        path = self.entry.folder / self.relative
        with os_errors("write the cache file", path, WRITE_HINT):
            try:
                digest = self.writer.finish(durable=durable)
                os.chmod(self.writer.path, 0o666 & ~_umask())
                os.replace(self.writer.path, path)
            except BaseException:
                self.writer.abort()
                raise
        self.entry._verified.add((self.relative, digest, *_stamp(path)))
        if record:
            self.entry.manifest.setdefault("files", {})[self.relative] = digest
            if self.relative == self.entry.latent_name(0):
                self.entry.manifest["latent_channels"] = int(self.writer.specs["latent"][1][1])
        return digest

    def abort(self) -> None:
        self.writer.abort()

    def __enter__(self) -> TensorWriter:
        return self

    def __exit__(self, kind, error, trace) -> None:
        if kind is not None:
            self.abort()


def _stamp(path: Path) -> tuple[int, int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns, stat.st_ino


class TrajectoryRows:
    """The cached trajectory links read a window at a time: `window(start, stop)` is the `TrajectorySet`
    of frames start .. stop - 1, equal to `links_from_tensors(read_trajectories()).window(start, stop)`."""

    def __init__(self, entry: CacheEntry, stored: TensorFile):
        self.entry, self.stored = entry, stored

    def links(self, start: int, stop: int):
        """`ClipLinks` of frames start .. stop - 1 (their stop - start - 1 pairs), values checked."""

        rows = {}
        with os_errors("read the cache file", self.stored.path, "rerun with --force, or pass --cache-dir"):
            for name in self.stored.tensors:
                try:
                    rows[name] = self.stored.rows(name, start, stop - 1)
                except TensorFileError as err:
                    raise UserError(f"The cache file {self.stored.path} cannot be read ({err}); rerun with "
                                    "--force.") from None
        for name, links in rows.items():
            tokens = self.stored.shape(name)[1]
            if links.numel() and (int(links.min()) < -1 or int(links.max()) >= tokens):
                raise self.entry._unfit("trajectories.safetensors", f"{name} links to tokens outside its grid")
        return links_from_tensors(rows, stop - start)

    def window(self, start: int, stop: int):
        return self.links(start, stop).window(0, stop - start)
