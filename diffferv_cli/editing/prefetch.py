"""Cache I/O behind the step loop: reads ahead of it and writes behind it in background threads, so the
device never waits for the disk (DESIGN.md, "a step loop with no host syncs ... cache I/O behind it").

* `WindowRows` hands the loop each window's latents (the rows of that window of each latent file it
  reads, `cache.LatentRows`: a few MB, never the clip), read ahead of use in a reader thread and moved
  to the device from pinned memory without blocking the host.
* `FeatureStream` does the same for disk-mode feature files (per step and window, read once each).
* `WriteBehind` runs the writes of finished frames and steps in order in one writer thread. Leaving the device is
  `to_host` (a non-blocking copy to pinned memory on CUDA; the writer waits for it, the loop does not).
  On exit (also on an exception or Ctrl-C) every queued write is finished, so what the loop reported as
  done is on disk; a writer error is raised in the loop's thread.

Durability does not depend on the threads: each step's files are written atomically (temporary file,
fsync, rename) before the manifest that names them is renamed into place, so a run killed at any moment
resumes from the last step whose manifest was replaced.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

import torch

T = TypeVar("T")


class _ReadAhead(Generic[T]):
    """`load(key)` run in one reader thread for the keys of `order`, at most `ahead` in flight."""

    def __init__(self, load: Callable[[Hashable], T], order: Sequence[Hashable], ahead: int = 2):
        self._load = load
        self._order = list(dict.fromkeys(order))  # each index read once
        self._ahead = max(1, ahead)
        self._next = 0
        self._futures: dict[Hashable, Future] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="diffferv-read")
        self._top_up()

    def _top_up(self) -> None:
        while len(self._futures) < self._ahead and self._next < len(self._order):
            index = self._order[self._next]
            self._next += 1
            if index not in self._futures:
                self._futures[index] = self._pool.submit(self._load, index)

    def take(self, index: Hashable) -> T:
        future = self._futures.pop(index, None)
        if future is None:  # not in the announced order (or already taken): read it now
            future = self._pool.submit(self._load, index)
        self._top_up()
        return future.result()

    def close(self) -> None:
        for future in self._futures.values():
            future.cancel()
        self._pool.shutdown(wait=True)


def _pinned(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Page-locked copy for an asynchronous host-to-device copy (CUDA only; elsewhere the tensor itself)."""
    return tensor.pin_memory() if device.type == "cuda" else tensor


class WindowRows:
    """What a step loop needs for each window, made ahead of it in a reader thread, for the windows
    `order` in that order: the latents it reads (`sources`: name -> a clip's latent, read a range of
    frames at a time, such as `cache.LatentRows`) and the window's attention context (`make_context(k)`,
    `inversion.WindowPlan`). `take(k)` -> ({name: rows of window k on `device`}, context). A window's rows
    are read once: the frames a step finishes after window k lie inside window k, so the loop slices
    them from what it took."""

    def __init__(self, sources: dict, windows: Sequence, order: Sequence[int], device: torch.device | str,
                 make_context: Callable[[int], object] = lambda index: None, ahead: int = 2):
        self.device = torch.device(device)

        def load(index):
            window = windows[index]
            rows = {name: _pinned(source[window.start:window.stop], self.device) for name, source in sources.items()}
            return rows, make_context(index)

        self._reader = _ReadAhead(load, order, ahead)

    def take(self, index: int) -> tuple[dict[str, torch.Tensor], object]:
        rows, context = self._reader.take(index)
        return {name: tensor.to(self.device, non_blocking=True) for name, tensor in rows.items()}, context

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> WindowRows:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class FeatureStream:
    """Disk-mode feature files `entry.read_features(step, window=window)` for the `(step, window)` keys of
    `order`, read ahead, handed out on `device`."""

    def __init__(self, entry, order: Sequence[tuple[int, int]], device: torch.device | str, ahead: int = 1):
        self.device = torch.device(device)

        def load(key):
            step, window = key
            return {name: _pinned(tensor, self.device)
                    for name, tensor in entry.read_features(step, window=window).items()}

        self._reader = _ReadAhead(load, order, ahead)

    def __call__(self, step: int, window: int = 0) -> dict[str, torch.Tensor]:
        return {name: tensor.to(self.device, non_blocking=True)
                for name, tensor in self._reader.take((step, window)).items()}

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> FeatureStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class HostTensor:
    """A device tensor on its way to the host: `get()` waits for the copy (call it in the writer thread)."""

    def __init__(self, tensor: torch.Tensor):
        if tensor.device.type == "cuda":
            self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self._host.copy_(tensor, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:  # a CPU tensor, or a device without asynchronous copies: copy now
            self._host = tensor.detach().to("cpu", copy=True)
            self._event = None

    def get(self) -> torch.Tensor:
        if self._event is not None:
            self._event.synchronize()
        return self._host


def to_host(tensors: dict[str, torch.Tensor]) -> dict[str, HostTensor]:
    return {name: HostTensor(tensor) for name, tensor in tensors.items()}


_STOP = object()


class WriteBehind:
    """Runs `submit`ted jobs in order in one writer thread, at most `depth` waiting (the loop blocks when
    the disk falls further behind). `close()` (or leaving the `with` block) finishes every queued job;
    the first job error is raised in the caller's thread, by `submit` or `close`."""

    def __init__(self, depth: int = 2):
        self._jobs: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="diffferv-write", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job is _STOP:
                    return
                if self._error is None:  # after a failure, later jobs (later steps) are skipped
                    job()
            except BaseException as err:  # noqa: BLE001 - handed to the loop's thread
                self._error = err
            finally:
                self._jobs.task_done()

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def submit(self, job: Callable[[], None]) -> None:
        self._raise()
        self._jobs.put(job)

    def wait(self) -> None:
        """Block until every job submitted so far has run; raise the first job error."""
        self._jobs.join()
        self._raise()

    def wait_quietly(self) -> None:
        """`wait`, keeping a job error to itself (the caller is already failing)."""
        self._jobs.join()
        self._error = None

    def close(self) -> None:
        if self._thread.is_alive():
            self._jobs.put(_STOP)
            self._thread.join()
        self._raise()

    def __enter__(self) -> WriteBehind:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # finish what was queued; the loop's own exception wins over a writer error
            self.close()
        except BaseException:  # noqa: BLE001
            pass
