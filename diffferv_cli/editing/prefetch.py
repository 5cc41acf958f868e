"""Cache I/O behind the step loop: reads ahead of it and writes behind it in background threads, so the
device never waits for the disk (DESIGN.md, "a step loop with no host syncs ... cache I/O behind it").

* `FeatureStream` hands the loop the disk-mode feature files it asks for, in the order it asks: each
  file is read and hash-checked once, in a reader thread, ahead of use, and moved to the device (from
  pinned memory, without blocking the host). (The latents are read a window at a time by the loops
  themselves, `cache.LatentRows`: a few MB per window, never the clip.)
* `WriteBehind` runs the writes of finished steps in order in one writer thread. Leaving the device is
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
