"""Flows -> trajectories on every self-attention token grid (paper 3.3, TTA; FLATTEN's post-processing).

Pure: numpy/torch in, tensors out; no model inside.

Format (the contract with the TTA processor and the cache):

* tokens of a clip on a grid (h, w) are numbered `frame * h * w + y * w + x`;
* `TrajectoryGrid.index` is (n_trajectories, max_len) int64, each row one trajectory, its tokens in
  frame order, LEFT-aligned and padded with -1; rows are sorted by length, longest first;
* every token of every frame appears exactly once in `index` (singleton trajectories allowed).

Linking rule (FLATTEN's post-processing, Cong et al. 2024; DESIGN.md 3), on each grid separately, with
the clip's flow resampled to the grid (`ClipFlow.resized`: vectors in grid cells, area-averaged):

1. token p of frame i links to q = round(p + forward_i(p)) of frame i + 1 (round half up, per axis) when q
   is inside the grid and p is not occluded;
2. several tokens of frame i landing on one q: the one with the smallest forward-backward error
   |forward_i(p) + backward_i(q)|^2 keeps the link (ties: smallest token number), the others end their
   trajectory at frame i;
3. a token of frame i + 1 that nobody links to starts a new trajectory.

Trajectories are numbered by where they start (frame, then token) before the stable sort by length, so
the output is a pure function of the flow. `naive_trajectories` is the same rule written as plain Python
loops over dicts: the reference the tests compare against and the benchmark's baseline. It and
`build_grid_trajectories` resample with `ClipFlow.resized`; `build_trajectories` resamples all grids at
once with `ClipFlow.resized_many` (coarser grids from finer ones: same values up to float rounding).

For the TTA processor: with `tokens` (frames * h * w, channels) of one branch,

    valid = index >= 0                                  # (n_trajectories, max_len)
    gathered = tokens[index.clamp(min=0)]               # (n_trajectories, max_len, channels)
    ... attention within each row, keys masked by `valid` ...
    out[index[valid]] = result[valid]                   # every token written exactly once

Rows are sorted longest first, so `buckets(grid)` can cut them into a few row ranges, each padded only
to its own longest row (`index[rows, :padded_length]`); at 512² about half the padded attention cost of
the 64² grid goes away (bench/bench_trajectories.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from diffferv_cli.temporal.flow import ClipFlow


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
        return TrajectoryGrid(
            self.height, self.width, self.frames, self.index.to(device), self.lengths.to(device)
        )


@dataclass(frozen=True)
class TrajectorySet:
    """Trajectories for each token grid of one clip, keyed by (height, width)."""

    grids: dict[tuple[int, int], TrajectoryGrid]

    def for_grid(self, height: int, width: int) -> TrajectoryGrid:
        return self.grids[(height, width)]

    def to(self, device: torch.device | str) -> TrajectorySet:
        return TrajectorySet({key: grid.to(device) for key, grid in self.grids.items()})


def token_grids(latent_size: tuple[int, int], levels: int) -> list[tuple[int, int]]:
    """The self-attention token grids of the UNet: the latent grid, then each side halved rounding up.

    `token_grids((64, 64), 4)` -> [(64, 64), (32, 32), (16, 16), (8, 8)];
    `token_grids((8, 12), 2)` -> [(8, 12), (4, 6)]. Same rule as `AttentionContext.grid_for`."""
    height, width = latent_size
    if height < 1 or width < 1 or levels < 1:
        raise ValueError(f"need a positive latent size and level count, got {latent_size} and {levels}")
    grids = []
    for _ in range(levels):
        grids.append((height, width))
        height, width = -(-height // 2), -(-width // 2)
    return grids


def build_trajectories(flow: ClipFlow, grids: Sequence[tuple[int, int]]) -> TrajectorySet:
    """Trajectories on every grid in `grids` (the flow resampled to all grids at once: `resized_many`)."""
    on_grids = flow.resized_many(grids)
    return TrajectorySet({(height, width): _link_grid(on_grids[(height, width)]) for height, width in grids})


def build_grid_trajectories(flow: ClipFlow, height: int, width: int) -> TrajectoryGrid:
    """Trajectories of one (height, width) token grid; vectorised over whole frames (loop over frames only)."""
    return _link_grid(flow.resized(height, width))


@dataclass(frozen=True)
class ClipLinks:
    """The links of a whole clip on each token grid, the compact form trajectories are kept in.

    `links[(h, w)]` is (frames - 1, h*w) int32: entry [i, q] is the token of frame i linked to token q of
    frame i + 1 (rules 1-2), or -1 when q starts a trajectory (rule 3). 4 bytes per token, whatever the
    clip's length, where a padded trajectory index grows with clip length times trajectory count.

    `window(start, stop)` gives the trajectories of frames start..stop-1 as an ordinary `TrajectorySet`:
    each trajectory of the clip cut to the window (a trajectory crossing the window's edge keeps only its
    tokens inside), tokens numbered from the window's first frame, rows re-sorted longest first. Chaining
    the window's own links is that cut, because a trajectory takes one token per consecutive frame: its
    part inside the window is exactly a chain of links between frames of the window. The whole clip's
    window is `build_trajectories` of the clip's flow."""

    frames: int
    links: dict[tuple[int, int], torch.Tensor]

    @property
    def grids(self) -> list[tuple[int, int]]:
        return list(self.links)

    def window(self, start: int, stop: int) -> TrajectorySet:
        if not 0 <= start < stop <= self.frames:
            raise ValueError(f"window {start}..{stop} is not inside a clip of {self.frames} frames")
        return TrajectorySet({
            (height, width): _chain(links[start:stop - 1].numpy().astype(np.int64), stop - start, height, width)
            for (height, width), links in self.links.items()
        })


def link_pairs(pairs: Iterable[ClipFlow], grids: Sequence[tuple[int, int]]) -> Iterator[dict[tuple[int, int], torch.Tensor]]:
    """Per consecutive pair (`flow_pairs`), its links on every grid: grid -> (h*w,) int32, the row
    `ClipLinks.links[grid][pair]`. The pair's flow is resampled to every grid, linked, and dropped."""
    for flow in pairs:
        yield {grid: torch.from_numpy(_links(on_grid)[0].astype(np.int32)) for grid, on_grid in flow.resized_many(grids).items()}


def link_clip(pairs: Iterable[ClipFlow], frames: int, grids: Sequence[tuple[int, int]],
              progress: Callable[[int, int], None] | None = None) -> ClipLinks:
    """Link a clip pair by pair (`link_pairs`) into one `ClipLinks`. Same links as `build_trajectories`
    on the whole flow."""
    links = {grid: torch.empty((max(frames - 1, 0), grid[0] * grid[1]), dtype=torch.int32) for grid in grids}
    count = 0
    for pair, rows in enumerate(link_pairs(pairs, grids)):
        for grid, row in rows.items():
            links[grid][pair] = row
        count = pair + 1
        if progress is not None:
            progress(count, frames - 1)
    if count != max(frames - 1, 0):
        raise ValueError(f"{count} flow pairs for a clip of {frames} frames")
    return ClipLinks(frames, links)


def _link_grid(flow: ClipFlow) -> TrajectoryGrid:
    """The linking rule (module docstring) on a flow already resampled to the token grid."""
    return _chain(_links(flow), flow.frames, *flow.size)


def _chain(previous: np.ndarray, frames: int, height: int, width: int) -> TrajectoryGrid:
    """Trajectories from the links `previous` (frames-1, tokens): token of frame i linked to token q of
    frame i+1, or -1."""
    tokens = height * width

    # Walk the frames once: each token takes its predecessor's trajectory id and position + 1, or opens a
    # new trajectory. Ids are handed out in (frame, token) order of the trajectory's first token.
    trajectory = np.empty((frames, tokens), np.int64)  # trajectory id of each (frame, token)
    position = np.empty((frames, tokens), np.int64)  # its place along that trajectory
    trajectory[0] = np.arange(tokens)
    position[0] = 0
    opened = tokens
    for frame in range(1, frames):
        source = previous[frame - 1]
        linked = source >= 0
        trajectory[frame, linked] = trajectory[frame - 1, source[linked]]
        position[frame, linked] = position[frame - 1, source[linked]] + 1
        fresh = np.flatnonzero(~linked)
        trajectory[frame, fresh] = np.arange(opened, opened + fresh.size)
        position[frame, fresh] = 0
        opened += fresh.size

    lengths = np.bincount(trajectory.ravel(), minlength=opened)  # (n_trajectories,)
    order = np.argsort(-lengths, kind="stable")  # longest first, ties in start order
    row_of = np.empty(opened, np.int64)
    row_of[order] = np.arange(opened)  # trajectory id -> its row in the sorted index
    index = np.full((opened, int(lengths.max())), -1, np.int64)  # (n_trajectories, max_len)
    index[row_of[trajectory.ravel()], position.ravel()] = np.arange(frames * tokens)  # frame*h*w + y*w + x
    return TrajectoryGrid(
        height=height,
        width=width,
        frames=frames,
        index=torch.from_numpy(index),
        lengths=torch.from_numpy(lengths[order]),
    )


def _links(flow: ClipFlow) -> np.ndarray:
    """(frames-1, tokens): for token q of frame i+1, the token of frame i linked to it, or -1.

    All frame pairs at once; `flow` is on the token grid (vectors in grid cells)."""
    pairs, (height, width) = flow.frames - 1, flow.size
    tokens = height * width
    row, col = np.divmod(np.arange(tokens), width)
    forward_x = flow.forward[..., 0].reshape(pairs, tokens).astype(np.float64)  # (pairs, tokens)
    forward_y = flow.forward[..., 1].reshape(pairs, tokens).astype(np.float64)
    target_x = np.floor(col + forward_x + 0.5).astype(np.int64)  # rule 1: round half up
    target_y = np.floor(row + forward_y + 0.5).astype(np.int64)
    inside = (target_x >= 0) & (target_x < width) & (target_y >= 0) & (target_y < height)
    pair, source = np.nonzero(inside & ~flow.occlusion.reshape(pairs, tokens))  # candidate links
    target = target_y[pair, source] * width + target_x[pair, source]
    slot = pair * tokens + target  # (pair, target) as one number

    # Rule 2: a target hit once takes its source; a contested target takes the source with the smallest
    # forward-backward error, ties by smallest source (lexsort on the contested links only).
    previous = np.full(pairs * tokens, -1, np.int64)
    contested = np.bincount(slot, minlength=pairs * tokens)[slot] > 1
    previous[slot[~contested]] = source[~contested]
    pair, source, target, slot = pair[contested], source[contested], target[contested], slot[contested]
    backward = flow.backward.reshape(pairs, tokens, 2)[pair, target].astype(np.float64)  # (links, 2)
    error_x = forward_x[pair, source] + backward[:, 0]
    error_y = forward_y[pair, source] + backward[:, 1]
    error = error_x * error_x + error_y * error_y
    order = np.lexsort((source, error, slot))
    slot, source = slot[order], source[order]
    first = np.ones(slot.size, bool)
    first[1:] = slot[1:] != slot[:-1]
    previous[slot[first]] = source[first]
    return previous.reshape(pairs, tokens)


def naive_trajectories(flow: ClipFlow, height: int, width: int) -> list[list[int]]:
    """Reference: the same linking rule as `build_grid_trajectories`, as plain loops over tokens with dicts.

    Slow and obviously correct; returns the trajectories as lists of token numbers in frame order
    (their order in the list is unspecified: compare as sets)."""
    flow = flow.resized(height, width)
    tokens = height * width
    forward, backward, occlusion = flow.forward.tolist(), flow.backward.tolist(), flow.occlusion.tolist()
    finished: list[list[int]] = []
    open_trajectories = {token: [token] for token in range(tokens)}  # token of this frame -> its trajectory
    for frame in range(flow.frames - 1):
        best: dict[int, tuple[float, int]] = {}  # target token -> (error, source token) of the best link
        for y in range(height):
            for x in range(width):
                if occlusion[frame][y][x]:
                    continue
                dx, dy = forward[frame][y][x]
                target_x, target_y = math.floor(x + dx + 0.5), math.floor(y + dy + 0.5)
                if not (0 <= target_x < width and 0 <= target_y < height):
                    continue
                back_x, back_y = backward[frame][target_y][target_x]
                error = (dx + back_x) * (dx + back_x) + (dy + back_y) * (dy + back_y)
                target, candidate = target_y * width + target_x, (error, y * width + x)
                if target not in best or candidate < best[target]:
                    best[target] = candidate
        next_open = {}
        for target, (_, source) in best.items():
            trajectory = open_trajectories.pop(source)
            trajectory.append((frame + 1) * tokens + target)
            next_open[target] = trajectory
        finished.extend(open_trajectories.values())  # not linked onwards: they end at this frame
        for token in range(tokens):
            if token not in next_open:
                next_open[token] = [(frame + 1) * tokens + token]
        open_trajectories = next_open
    finished.extend(open_trajectories.values())
    return finished


def buckets(grid: TrajectoryGrid, max_buckets: int = 4) -> list[tuple[slice, int]]:
    """Split the (length-sorted) rows of `grid.index` into at most `max_buckets` contiguous row ranges.

    Returns [(rows, padded_length), ...] in row order, covering every row once; `grid.index[rows,
    :padded_length]` holds that bucket's trajectories with less padding. The split minimises the padded
    attention cost sum(rows * padded_length^2) (optimal, dynamic programming over the distinct lengths).
    A bucket of padded length 1 holds singletons, whose trajectory attention is just their own value."""
    if max_buckets < 1:
        raise ValueError("max_buckets must be at least 1")
    lengths = grid.lengths.tolist()
    if not lengths:
        return []
    # Runs of equal length: (first row, run length in rows, length value); rows are sorted descending.
    starts = [0] + [row for row in range(1, len(lengths)) if lengths[row] != lengths[row - 1]]
    bounds = starts + [len(lengths)]
    runs = len(starts)

    def cost(
        first: int, stop: int
    ) -> int:  # rows bounds[first]:bounds[stop], padded to lengths[bounds[first]]
        return (bounds[stop] - bounds[first]) * lengths[bounds[first]] ** 2

    # best[b][j]: cheapest split of runs j.. into at most b buckets; cut[b][j]: where its first bucket ends.
    best = [[0] * (runs + 1) for _ in range(max_buckets + 1)]
    cut = [[runs] * (runs + 1) for _ in range(max_buckets + 1)]
    for j in range(runs):
        best[1][j] = cost(j, runs)
    for b in range(2, max_buckets + 1):
        for j in range(runs):
            best[b][j], cut[b][j] = min((cost(j, k) + best[b - 1][k], k) for k in range(j + 1, runs + 1))
    result, j, b = [], 0, max_buckets
    while j < runs:
        stop = cut[b][j] if b > 1 else runs
        result.append((slice(bounds[j], bounds[stop]), lengths[bounds[j]]))
        j, b = stop, b - 1
    return result
