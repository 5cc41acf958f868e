"""One clip across several processes or GPUs: the windows of every UNet pass split across the ranks of a
torch.distributed job (`torchrun --nproc-per-node N -m diffferv_cli ...`, or `accelerate launch`).

The windows of a pass are independent and their blend is a weighted sum (temporal/windows.py,
`NoiseBlend`), so each rank runs the windows it owns (window k on rank k mod N), adds them into its own
partial blend, and one all-reduce per pass gives every rank the whole clip's noise. Every rank then takes
the same DDIM step, so all ranks hold the same latents; rank 0 alone writes the cache and the outputs.
The result equals a one-process run up to the order of the floating-point additions.

NCCL on CUDA devices (each rank on `cuda:LOCAL_RANK`), gloo on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def owns(self, window_index: int) -> bool:
        return window_index % self.world == self.rank

    def reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the ranks, in place (every rank gets the sum)."""
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def share(self, value):
        """Rank 0's `value` on every rank (a small picklable object)."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


    def share_of(self, count: int) -> slice:
        """This rank's contiguous share of `count` items (frames to decode): the shares of all ranks, in
        rank order, cover 0 .. count once."""
        start, stop = count * self.rank // self.world, count * (self.rank + 1) // self.world
        return slice(start, stop)

    def gather(self, part):
        """Every rank's `part` (a picklable object, e.g. its decoded frames) on rank 0, in rank order; None
        on the other ranks."""
        if self.world == 1:
            return [part]
        import torch.distributed as dist

        parts = [None] * self.world if self.main else None
        dist.gather_object(part, parts, dst=0)
        return parts


SINGLE = Ranks()


def launched_world() -> int:
    """The number of ranks a launcher (torchrun, accelerate) started, 1 when none."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def from_environment(device: torch.device) -> Ranks:
    """The ranks of this job, joining its process group when a launcher started several (once per
    process); `SINGLE` otherwise."""
    world = launched_world()
    if world <= 1:
        return SINGLE
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Ranks(rank=dist.get_rank(), world=dist.get_world_size())


def rank_device(requested: torch.device) -> torch.device:
    """Under a launcher, each rank's own GPU: `cuda:LOCAL_RANK` when `requested` is CUDA without an index."""
    if requested.type == "cuda" and requested.index is None and launched_world() > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return requested
