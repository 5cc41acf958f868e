"""diffferv_cli.temporal.trajectories: the vectorised linking against the plain-Python reference, and known motions."""

from __future__ import annotations

import itertools

import cv2
import numpy as np
import pytest
import torch

from diffferv_cli.temporal.flow import ClipFlow, DISFlow, compute_flow
from diffferv_cli.temporal.trajectories import (
    TrajectoryGrid,
    TrajectorySet,
    buckets,
    build_grid_trajectories,
    build_trajectories,
    link_clip,
    naive_trajectories,
    token_grids,
)


def partition(grid: TrajectoryGrid) -> set[tuple[int, ...]]:
    return {tuple(row[row >= 0].tolist()) for row in grid.index}


def check_format(grid: TrajectoryGrid) -> None:
    """The FORMAT CONTRACT of trajectories.py."""
    index, lengths = grid.index, grid.lengths
    assert index.dtype == torch.int64 and lengths.dtype == torch.int64
    assert index.shape == (len(lengths), int(lengths.max()))
    assert torch.all(lengths[:-1] >= lengths[1:])  # longest first
    columns = torch.arange(index.shape[1])
    assert torch.equal(index >= 0, columns[None, :] < lengths[:, None])  # left-aligned, -1 padded
    assert torch.all(index[index < 0] == -1)
    tokens = index[index >= 0]
    assert torch.equal(tokens.sort().values, torch.arange(grid.frames * grid.tokens))  # each token once
    frame = torch.where(index >= 0, index // grid.tokens, -1)
    steps = frame[:, 1:] - frame[:, :-1]
    assert torch.all(steps[index[:, 1:] >= 0] == 1)  # one token per consecutive frame


def random_flow(
    rng: np.random.Generator, frames: int, height: int, width: int, *, integer: bool = False
) -> ClipFlow:
    """Flow on the grid itself: large enough to collide and leave the grid, some occlusion."""
    spread = rng.uniform(0.3, 2.5)
    forward = rng.normal(0, spread, (frames - 1, height, width, 2)).astype(np.float32)
    backward = -forward + rng.normal(0, 0.5, forward.shape).astype(np.float32)
    if integer:  # exact .5 roundings and equal errors: the tie rules decide
        forward, backward = np.round(forward * 2) / 2, np.round(backward)
    occlusion = rng.random((frames - 1, height, width)) < 0.1
    return ClipFlow(forward, backward, occlusion)


def textured(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = sum(
        sigma * cv2.GaussianBlur(rng.standard_normal((height, width, 3)).astype(np.float32), (0, 0), sigma)
        for sigma in (1.5, 4.0)
    )
    return (255 * (image - image.min()) / np.ptp(image)).astype(np.uint8)


@pytest.fixture(scope="module")
def dis_flow() -> ClipFlow:
    """DIS flow of a small synthetic clip (64x96 px, 6 frames): drifting background, a square crossing."""
    background, square = textured(64, 112, seed=1), textured(24, 24, seed=2)
    frames = []
    for frame in range(6):
        image = np.ascontiguousarray(background[:, 2 * frame : 2 * frame + 96])  # pans 2 px per frame
        image[20:44, 10 + 7 * frame : 34 + 7 * frame] = square
        frames.append(image)
    return compute_flow(np.stack(frames), DISFlow("fast"))


def test_token_grids():
    assert token_grids((64, 64), 4) == [(64, 64), (32, 32), (16, 16), (8, 8)]
    assert token_grids((8, 12), 2) == [(8, 12), (4, 6)]
    assert token_grids((9, 5), 3) == [(9, 5), (5, 3), (3, 2)]
    with pytest.raises(ValueError):
        token_grids((0, 8), 2)


@pytest.mark.parametrize("seed", range(8))
def test_vectorised_equals_naive_on_random_flows(seed):
    rng = np.random.default_rng(seed)
    frames, height, width = int(rng.integers(2, 7)), int(rng.integers(1, 9)), int(rng.integers(1, 11))
    for size in [(height, width), (6, 10), (8, 12)]:
        flow = random_flow(rng, frames, *size, integer=seed % 2 == 1)
        grid = build_grid_trajectories(flow, *size)
        check_format(grid)
        assert partition(grid) == {tuple(t) for t in naive_trajectories(flow, *size)}


def test_vectorised_equals_naive_on_dis_flow(dis_flow):
    grids = token_grids((8, 12), 3)  # from 64x96 px: 8x12, 4x6, 2x3
    built = build_trajectories(dis_flow, grids)
    on_grids = dis_flow.resized_many(grids)
    for height, width in grids:
        grid = built.for_grid(height, width)
        check_format(grid)
        assert (grid.height, grid.width, grid.frames) == (height, width, 6)
        assert partition(grid) == {
            tuple(t) for t in naive_trajectories(on_grids[(height, width)], height, width)
        }
        single = build_grid_trajectories(dis_flow, height, width)  # direct resampling, same as the reference
        assert partition(single) == {tuple(t) for t in naive_trajectories(dis_flow, height, width)}
    assert max(built.for_grid(8, 12).lengths) >= 4  # the motion is followed, not all singletons


def test_deterministic(dis_flow):
    first = build_trajectories(dis_flow, [(8, 12), (4, 6)])
    second = build_trajectories(dis_flow, [(8, 12), (4, 6)])
    for key in first.grids:
        assert torch.equal(first.grids[key].index, second.grids[key].index)
        assert torch.equal(first.grids[key].lengths, second.grids[key].lengths)


def test_known_translation_non_square():
    """Content moving right by exactly 2 token cells (16 px on an 8-px grid) per frame, 48x80 px -> 6x10."""
    frames, height, width, cell, step = 4, 6, 10, 8, 2
    forward = np.zeros((frames - 1, height * cell, width * cell, 2), np.float32)
    forward[..., 0] = step * cell
    flow = ClipFlow(forward, -forward, np.zeros(forward.shape[:3], bool))
    grid = build_grid_trajectories(flow, height, width)
    check_format(grid)

    def token(frame, y, x):
        return frame * height * width + y * width + x

    expected = set()
    for start in range(frames):
        for y, x in itertools.product(range(height), range(width)):
            if start > 0 and x >= step:
                continue  # reached from the previous frame
            run = [token(start + k, y, x + step * k) for k in range(frames - start) if x + step * k < width]
            expected.add(tuple(run))
    assert partition(grid) == expected
    assert grid.lengths[0] == frames  # columns 0 and 1 of frame 0 cross the whole clip
    assert partition(grid) == {tuple(t) for t in naive_trajectories(flow, height, width)}


def test_occluded_token_ends_its_trajectory():
    frames, height, width = 3, 4, 5
    zero = np.zeros((frames - 1, height, width, 2), np.float32)
    occlusion = np.zeros((frames - 1, height, width), bool)
    occlusion[0, 1, 2] = True  # token (y=1, x=2) of frame 0 has no match in frame 1
    grid = build_grid_trajectories(ClipFlow(zero, zero, occlusion), height, width)
    tokens = height * width
    blocked = 1 * width + 2
    assert (blocked,) in partition(grid)  # ends at once
    assert (tokens + blocked, 2 * tokens + blocked) in partition(grid)  # frame 1 starts a new one
    assert sorted(grid.lengths.tolist()) == [1] + [2] + [3] * (tokens - 1)


def test_collisions_keep_exactly_one():
    height, width = 1, 4
    forward = np.zeros((1, height, width, 2), np.float32)
    backward = np.zeros_like(forward)
    forward[0, 0, 0] = (1, 0)  # tokens 0 and 1 both land on token 1 ...
    backward[0, 0, 1] = (-1, 0)  # ... and the backward flow there points back to token 0
    forward[0, 0, 2] = (1, 0)  # tokens 2 and 3 land on 3 with equal errors (0.25): smallest source wins
    backward[0, 0, 3] = (-0.5, 0)
    flow = ClipFlow(forward, backward, np.zeros((1, height, width), bool))
    grid = build_grid_trajectories(flow, height, width)
    assert partition(grid) == {(0, 5), (1,), (4,), (2, 7), (3,), (6,)}
    assert partition(grid) == {tuple(t) for t in naive_trajectories(flow, height, width)}


def test_one_frame_gives_singletons():
    flow = ClipFlow(
        np.zeros((0, 16, 24, 2), np.float32),
        np.zeros((0, 16, 24, 2), np.float32),
        np.zeros((0, 16, 24), bool),
    )
    trajectories = build_trajectories(flow, token_grids((4, 6), 2))
    grid = trajectories.for_grid(4, 6)
    assert grid.frames == 1 and grid.index.shape == (24, 1)
    assert torch.equal(grid.index[:, 0], torch.arange(24)) and torch.all(grid.lengths == 1)
    assert trajectories.for_grid(2, 3).index.shape == (6, 1)
    assert naive_trajectories(flow, 4, 6) == [[token] for token in range(24)]


def brute_force_cost(lengths: list[int], max_buckets: int) -> int:
    best = None
    for count in range(1, max_buckets + 1):
        for cuts in itertools.combinations(range(1, len(lengths)), count - 1):
            bounds = [0, *cuts, len(lengths)]
            cost = sum((stop - start) * lengths[start] ** 2 for start, stop in itertools.pairwise(bounds))
            best = cost if best is None else min(best, cost)
    return best


def test_buckets_cover_rows_and_are_optimal():
    rng = np.random.default_rng(0)
    for _ in range(5):
        lengths = sorted(rng.integers(1, 9, size=int(rng.integers(1, 12))).tolist(), reverse=True)
        index = torch.full((len(lengths), lengths[0]), -1, dtype=torch.int64)  # only lengths matter here
        grid = TrajectoryGrid(1, 1, lengths[0], index, torch.tensor(lengths))
        for max_buckets in (1, 2, 3):
            split = buckets(grid, max_buckets)
            assert 1 <= len(split) <= max_buckets
            assert split[0][0].start == 0 and split[-1][0].stop == len(lengths)
            for (rows, _), (following, _) in itertools.pairwise(split):
                assert rows.stop == following.start
            assert all(padded == lengths[rows.start] for rows, padded in split)
            cost = sum((rows.stop - rows.start) * padded**2 for rows, padded in split)
            assert cost == brute_force_cost(lengths, max_buckets)


def test_buckets_on_real_trajectories(dis_flow):
    grid = build_grid_trajectories(dis_flow, 8, 12)
    split = buckets(grid)
    assert sum(rows.stop - rows.start for rows, _ in split) == len(grid.lengths)
    for rows, padded in split:
        assert torch.all(grid.index[rows, padded:] == -1)  # nothing cut off


def test_token_grids_at_the_smallest_sizes():
    assert token_grids((1, 1), 3) == [(1, 1), (1, 1), (1, 1)]  # a 1x1 latent stays 1x1
    assert token_grids((1, 3), 1) == [(1, 3)]
    for size, levels in [((0, 8), 2), ((8, 0), 2), ((8, 8), 0)]:
        with pytest.raises(ValueError, match="positive latent size and level count"):
            token_grids(size, levels)


def test_trajectories_of_equal_length_come_in_start_order():
    """Rows are longest first and, among equal lengths, in the order of their first token (the rule that
    makes the layout deterministic whatever the sort algorithm); here 96 trajectories of length 3."""
    frames, height, width = 3, 8, 12
    still = np.zeros((frames - 1, height, width, 2), np.float32)
    grid = build_grid_trajectories(ClipFlow(still, still, np.zeros((frames - 1, height, width), bool)), height, width)
    tokens = height * width
    assert torch.equal(grid.lengths, torch.full((tokens,), 3))
    assert torch.equal(grid.index, torch.arange(tokens)[:, None] + tokens * torch.arange(3)[None, :])
    rng = np.random.default_rng(3)
    grid = build_grid_trajectories(random_flow(rng, 4, height, width), height, width)
    for row in range(len(grid.lengths) - 1):
        if grid.lengths[row] == grid.lengths[row + 1]:
            assert grid.index[row, 0] < grid.index[row + 1, 0]


def test_trajectory_sets_move_between_devices_unchanged():
    index, lengths = torch.tensor([[0, 2], [1, -1], [3, -1]]), torch.tensor([2, 1, 1])
    grid = TrajectoryGrid(1, 2, 2, index, lengths)
    moved = TrajectorySet({(1, 2): grid}).to("meta")
    assert moved.grids[(1, 2)].index.device.type == "meta" and moved.grids[(1, 2)].lengths.device.type == "meta"
    back = TrajectorySet({(1, 2): grid}).to("cpu").for_grid(1, 2)
    assert (back.height, back.width, back.frames) == (1, 2, 2)
    assert torch.equal(back.index, index) and torch.equal(back.lengths, lengths)


def _collisions_and_occlusion() -> tuple[ClipFlow, ClipFlow]:
    """Two pair flows on a 1x4 grid: the collisions of `test_collisions_keep_exactly_one`, then no motion
    with token 2 occluded."""
    forward = np.zeros((1, 1, 4, 2), np.float32)
    backward = np.zeros_like(forward)
    forward[0, 0, 0] = forward[0, 0, 2] = (1, 0)
    backward[0, 0, 1], backward[0, 0, 3] = (-1, 0), (-0.5, 0)
    collide = ClipFlow(forward, backward, np.zeros((1, 1, 4), bool))
    occlusion = np.zeros((1, 1, 4), bool)
    occlusion[0, 0, 2] = True
    still = ClipFlow(np.zeros_like(forward), np.zeros_like(forward), occlusion)
    return collide, still


def test_link_clip_keeps_each_pairs_links_as_int32_and_reports_each_pair():
    calls = []
    links = link_clip(_collisions_and_occlusion(), 3, [(1, 4)], progress=lambda *done: calls.append(done))
    assert links.frames == 3 and links.grids == [(1, 4)]
    assert links.links[(1, 4)].dtype == torch.int32
    # entry [i, q]: the token of frame i linked to token q of frame i + 1, -1 where q starts a trajectory
    assert links.links[(1, 4)].tolist() == [[-1, 0, -1, 2], [0, 1, -1, 3]]
    assert calls == [(1, 2), (2, 2)]
    assert partition(links.window(0, 3).for_grid(1, 4)) == {(0, 5, 9), (1,), (2, 7, 11), (3,), (4, 8), (6,), (10,)}
    assert partition(links.window(1, 3).for_grid(1, 4)) == {(0, 4), (1, 5), (2,), (3, 7), (6,)}


def test_link_clip_of_one_frame_has_no_links_and_a_missing_pair_is_an_error():
    single = link_clip([], 1, [(2, 3)])
    assert single.links[(2, 3)].shape == (0, 6) and single.links[(2, 3)].dtype == torch.int32
    assert partition(single.window(0, 1).for_grid(2, 3)) == {(token,) for token in range(6)}
    with pytest.raises(ValueError, match=r"^1 flow pairs for a clip of 3 frames$"):
        link_clip(_collisions_and_occlusion()[:1], 3, [(1, 4)])


@pytest.mark.parametrize("start, stop", [(1, 1), (2, 1), (-1, 2), (0, 4)])
def test_a_window_outside_the_clip_is_refused(start, stop):
    links = link_clip(_collisions_and_occlusion(), 3, [(1, 4)])
    with pytest.raises(ValueError, match=rf"^window {start}\.\.{stop} is not inside a clip of 3 frames$"):
        links.window(start, stop)


def _lengths_grid(lengths: list[int]) -> TrajectoryGrid:
    index = torch.full((len(lengths), lengths[0]), -1, dtype=torch.int64)  # only lengths matter here
    return TrajectoryGrid(1, 1, lengths[0], index, torch.tensor(lengths))


@pytest.mark.parametrize("lengths, max_buckets, expected", [
    # at most 4 by default: five lengths, the two shortest share a bucket (25 + 16 + 9 + 2*4 = 58)
    ([5, 4, 3, 2, 1], None, [(0, 1, 5), (1, 2, 4), (2, 3, 3), (3, 5, 2)]),
    ([5, 4, 3, 2, 1], 5, [(0, 1, 5), (1, 2, 4), (2, 3, 3), (3, 4, 2), (4, 5, 1)]),
    # buckets only split where the length changes, never inside a run of equal lengths
    ([2, 2, 2, 1], 4, [(0, 3, 2), (3, 4, 1)]),
    # cost rows * length^2: 4*9 + 6*1 = 42 beats 9 + 9*4 = 45 (a cubic cost would choose the other)
    ([3, 2, 2, 2, 1, 1, 1, 1, 1, 1], 2, [(0, 4, 3), (4, 10, 1)]),
    ([4, 1], 1, [(0, 2, 4)]),
])
def test_buckets_exact_splits(lengths, max_buckets, expected):
    grid = _lengths_grid(lengths)
    split = buckets(grid) if max_buckets is None else buckets(grid, max_buckets)
    assert [(rows.start, rows.stop, padded) for rows, padded in split] == expected


def test_buckets_need_at_least_one():
    with pytest.raises(ValueError, match=r"^max_buckets must be at least 1$"):
        buckets(_lengths_grid([2, 1]), 0)
