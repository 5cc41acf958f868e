"""Flows -> trajectories on every self-attention token grid (paper 3.3, TTA; FLATTEN's post-processing).

Pure: numpy/torch in, tensors out; no model inside.

Format (the contract with the TTA processor and the cache):

* tokens of a clip on a grid (h, w) are numbered `frame * h * w + y * w + x`;
* `TrajectoryGrid.index` is (n_trajectories, max_len) int64, each row one trajectory, its tokens in
  frame order, LEFT-aligned and padded with -1; rows are sorted by length, longest first;
* every token of every frame appears exactly once in `index` (singleton trajectories allowed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TrajectoryGrid:
    height: int
    width: int
    frames: int
    index: torch.Tensor  # (n_trajectories, max_len) int64, -1 padded, left-aligned, longest first
    lengths: torch.Tensor  # (n_trajectories,) int64

    @property
    def tokens(self) -> int:
        return self.height * self.width

    def to(self, device: torch.device | str) -> TrajectoryGrid:
        return TrajectoryGrid(self.height, self.width, self.frames, self.index.to(device), self.lengths.to(device))


@dataclass(frozen=True)
class TrajectorySet:
    """Trajectories for each token grid of one clip, keyed by (height, width)."""

    grids: dict[tuple[int, int], TrajectoryGrid]

    def for_grid(self, height: int, width: int) -> TrajectoryGrid:
        return self.grids[(height, width)]

    def to(self, device: torch.device | str) -> TrajectorySet:
        return TrajectorySet({key: grid.to(device) for key, grid in self.grids.items()})
