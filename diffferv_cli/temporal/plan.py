"""What TTA needs from a clip's trajectories, computed once per clip (or temporal window) and kept on the
device, so a UNet call only gathers, attends and scatters: no checks, no data-dependent sizes, no host sync.

    plan = TrajectoryPlan.build(trajectory_set)          # checks the partition once, on the set's device
    ctx = AttentionContext(..., trajectories=trajectory_set)   # builds the plan itself when not given one

For each token grid (`GridPlan`), the length-sorted trajectory rows are cut into the cost-optimal length
buckets of `trajectories.buckets`; each bucket of padded length L > 1 holds

    slots : (rows * L,) int64     token numbers to gather, row by row (padding reads token 0, masked)
    mask  : (rows, 1, 1, L) bool  True on real tokens; None when no row of the bucket is padded

and the single-token trajectories (a bucket of padded length 1) are one index of token numbers. TTA's
output is assembled with one gather:

    pieces  = [attended rows of bucket 0 (rows*L positions), ..., values of the singletons]
    output  = cat(pieces)[:, inverse]          # inverse: (frames*tokens,) position of each token in `pieces`

Padding positions are computed and never read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffferv_cli.temporal.trajectories import TrajectoryGrid, TrajectorySet, buckets


def check_partition(grid: TrajectoryGrid, frames: int | None = None, tokens: int | None = None) -> None:
    """Raise ValueError unless `grid` partitions its frames*tokens tokens (the TTA contract): rows sorted
    longest first, left-aligned, -1 padded, matching their lengths, every token exactly once."""
    if (frames is not None and grid.frames != frames) or (tokens is not None and grid.tokens != tokens):
        raise ValueError(
            f"trajectories are for {grid.frames} frames of a {grid.height}x{grid.width} grid, but the UNet "
            f"call has {frames} frames of {tokens} tokens"
        )
    index, lengths = grid.index, grid.lengths
    if lengths.numel() > 1 and bool((lengths[1:] > lengths[:-1]).any()):
        raise ValueError("trajectory rows must be sorted longest first")
    slots = torch.arange(index.shape[1], device=index.device)
    if not torch.equal(index >= 0, slots[None, :] < lengths[:, None]):
        raise ValueError("trajectory rows must be left-aligned, -1 padded, and match their lengths")
    members = index[index >= 0]
    total = grid.frames * grid.tokens
    counts = torch.bincount(members, minlength=total) if members.numel() else members
    if members.numel() != total or counts.numel() != total or bool((counts != 1).any()):
        raise ValueError("trajectories must hold every token of every frame exactly once")


@dataclass(frozen=True)
class BucketPlan:
    """Rows of one length bucket: `rows` trajectories padded to `length` tokens."""

    rows: int
    length: int
    slots: torch.Tensor  # (rows * length,) int64 token numbers, padding -> 0
    mask: torch.Tensor | None  # (rows, 1, 1, length) bool, True = real token; None when unpadded


@dataclass(frozen=True)
class GridPlan:
    """TTA's gather/scatter plan for one token grid of one clip (see the module docstring)."""

    height: int
    width: int
    frames: int
    buckets: tuple[BucketPlan, ...]
    singletons: torch.Tensor  # (n,) int64 token numbers of single-token trajectories
    inverse: torch.Tensor  # (frames*tokens,) int64 position of each token in the concatenated pieces

    @property
    def tokens(self) -> int:
        return self.height * self.width

    @classmethod
    def build(cls, grid: TrajectoryGrid, device: torch.device | str | None = None, max_buckets: int = 4,
              check: bool = True) -> GridPlan:
        """Check `grid` (unless told it was checked) and precompute its plan on `device` (default: the
        grid's own device)."""
        if check:
            check_partition(grid)
        device = torch.device(device) if device is not None else grid.index.device
        index = grid.index.to(device)
        total = grid.frames * grid.tokens
        inverse = torch.empty(total, dtype=torch.int64, device=device)
        plans: list[BucketPlan] = []
        singletons = index.new_empty(0)
        offset = 0  # position of the next piece in the concatenation
        for rows, length in buckets(grid, max_buckets):
            block = index[rows, :length]  # (rows, length), -1 padded
            if length == 1:
                singletons = block[:, 0].contiguous()
                continue
            valid = block >= 0
            slots = block.clamp(min=0).reshape(-1)
            positions = torch.arange(offset, offset + slots.numel(), device=device)
            inverse[block[valid]] = positions[valid.reshape(-1)]
            padded = not bool(valid.all())
            plans.append(BucketPlan(rows.stop - rows.start, length, slots,
                                    valid[:, None, None, :].contiguous() if padded else None))
            offset += slots.numel()
        inverse[singletons] = torch.arange(offset, offset + singletons.numel(), device=device)
        return cls(grid.height, grid.width, grid.frames, tuple(plans), singletons, inverse)


@dataclass(frozen=True)
class TrajectoryPlan:
    """`GridPlan`s for every grid of one `TrajectorySet`; `source` is the set it was built from."""

    grids: dict[tuple[int, int], GridPlan]
    source: TrajectorySet | None = None

    @classmethod
    def build(cls, trajectory_set: TrajectorySet, device: torch.device | str | None = None,
              max_buckets: int = 4) -> TrajectoryPlan:
        """Check every grid of `trajectory_set` once and precompute its plan on `device` (default: where
        the set's tensors are). Raises ValueError on a set that is not a partition."""
        grids = {key: GridPlan.build(grid, device, max_buckets) for key, grid in trajectory_set.grids.items()}
        return cls(grids, trajectory_set)

    def get(self, height: int, width: int) -> GridPlan | None:
        return self.grids.get((height, width))
