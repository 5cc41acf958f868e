"""diffferv_cli.temporal.flow: DIS on known motion, the forward-backward occlusion check, resampling to token grids."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from diffferv_cli.temporal.flow import ClipFlow, DISFlow, compute_flow, occlusion_mask


def textured(height: int, width: int, seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8 texture at two scales, coarse one stronger: DIS finds a match everywhere."""
    rng = np.random.default_rng(seed)
    image = sum(
        sigma * cv2.GaussianBlur(rng.standard_normal((height, width, 3)).astype(np.float32), (0, 0), sigma)
        for sigma in (1.5, 4.0)
    )
    image = (image - image.min()) / np.ptp(image)
    return (255 * image).astype(np.uint8)


def shifted(image: np.ndarray, dx: float, dy: float) -> np.ndarray:
    """`image` moved by (dx, dy): the true flow from `image` to the result is (dx, dy) everywhere."""
    matrix = np.float32([[1, 0, dx], [0, 1, dy]])
    height, width = image.shape[:2]
    return cv2.warpAffine(
        image, matrix, (width, height), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT
    )


def constant_flow(pairs: int, height: int, width: int, dx: float, dy: float) -> np.ndarray:
    flow = np.zeros((pairs, height, width, 2), np.float32)
    flow[..., 0], flow[..., 1] = dx, dy
    return flow


@pytest.mark.parametrize("preset", ["ultrafast", "medium"])
def test_dis_recovers_a_known_shift(preset):
    frame_a = textured(96, 128)  # non-square on purpose
    frame_b = shifted(frame_a, 3.5, -2.25)
    flow = DISFlow(preset)(frame_a, frame_b)
    assert flow.shape == (96, 128, 2) and flow.dtype == np.float32
    interior = flow[16:-16, 16:-16]
    error = np.linalg.norm(interior - np.float32([3.5, -2.25]), axis=-1)
    assert error.mean() < 0.5
    assert np.median(error) < 0.3


def test_dis_rejects_bad_input():
    with pytest.raises(ValueError, match="preset"):
        DISFlow("slowest")
    with pytest.raises(ValueError, match="shape"):
        DISFlow()(textured(32, 32), textured(32, 48))


def test_compute_flow_shapes_progress_and_backward():
    first = textured(64, 80, seed=1)
    frames = np.stack([first, shifted(first, 2, 1), shifted(first, 4, 2)])  # (3, 64, 80, 3)
    calls = []
    flow = compute_flow(frames, DISFlow("fast"), progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 2), (2, 2)]
    assert flow.frames == 3 and flow.size == (64, 80)
    assert flow.forward.shape == flow.backward.shape == (2, 64, 80, 2)
    assert flow.occlusion.shape == (2, 64, 80) and flow.occlusion.dtype == bool
    interior = (slice(None), slice(12, -12), slice(12, -12))
    assert np.abs(flow.forward[interior] - np.float32([2, 1])).mean() < 0.5
    assert np.abs(flow.backward[interior] + np.float32([2, 1])).mean() < 0.5
    assert flow.occlusion[interior].mean() < 0.05  # a pure shift hides nothing inside


def test_compute_flow_of_one_frame_is_empty():
    flow = compute_flow(textured(40, 56)[None])
    assert flow.frames == 1 and flow.size == (40, 56)
    assert flow.forward.shape == flow.backward.shape == (0, 40, 56, 2)
    assert flow.occlusion.shape == (0, 40, 56)
    assert flow.resized(5, 7).forward.shape == (0, 5, 7, 2)


def test_occlusion_mask_on_analytic_flows():
    height, width = 20, 30
    forward = constant_flow(1, height, width, 4, 0)
    backward = constant_flow(1, height, width, -4, 0)
    backward[0, :, 10:14] = 0  # what lands on columns 10..13 of frame b did not come from 4 px to the left
    occluded = occlusion_mask(forward, backward)
    expected = np.zeros((1, height, width), bool)
    expected[0, :, 6:10] = True  # their targets 10..13 disagree with the backward flow
    expected[0, :, width - 4 :] = True  # leave the frame
    np.testing.assert_array_equal(occluded, expected)
    assert occlusion_mask(forward[0], backward[0]).shape == (height, width)  # one pair without batch axis


def test_occlusion_mask_flags_what_a_moving_square_covers():
    background, square = textured(128, 160, seed=2), textured(48, 48, seed=3)
    frame_a, frame_b = background.copy(), background.copy()
    frame_a[40:88, 32:80] = square
    frame_b[40:88, 40:88] = square  # the square moves 8 px right and covers columns 80..87
    flow = compute_flow(np.stack([frame_a, frame_b]))
    occluded = flow.occlusion[0]
    assert occluded[44:84, 82:86].mean() > 0.7  # background of frame a hidden in frame b
    assert occluded[44:84, 36:76].mean() < 0.05  # the square itself is found again
    assert occluded[:, 104:].mean() < 0.05  # static background away from the square


def test_resized_scales_vectors_per_axis_on_a_non_square_grid():
    forward = constant_flow(2, 64, 96, 12.0, -4.0)
    flow = ClipFlow(forward, -forward, np.zeros((2, 64, 96), bool))
    small = flow.resized(8, 16)  # 8x fewer rows, 6x fewer columns
    assert small.forward.shape == (2, 8, 16, 2) and small.forward.dtype == np.float32
    np.testing.assert_allclose(small.forward[..., 0], 12.0 / 6, rtol=1e-6)
    np.testing.assert_allclose(small.forward[..., 1], -4.0 / 8, rtol=1e-6)
    np.testing.assert_allclose(small.backward, -small.forward, rtol=1e-6)
    large = flow.resized(128, 144)  # enlarging: vectors grow by 2 (rows) and 1.5 (columns)
    np.testing.assert_allclose(large.forward[0, 5, 7], [18.0, -8.0], rtol=1e-6)
    assert flow.resized(64, 96) is flow


def test_resized_occlusion_needs_most_of_a_cell():
    occluded = np.zeros((1, 32, 48), bool)
    occluded[0, 0:8, 0:8] = True  # cell (0, 0) of an 8-px grid fully
    occluded[0, 0:8, 8:12] = True  # cell (0, 1) half
    occluded[0, 8:10, 0:8] = True  # cell (1, 0) a quarter
    zero = np.zeros((1, 32, 48, 2), np.float32)
    small = ClipFlow(zero, zero, occluded).resized(4, 6)
    expected = np.zeros((1, 4, 6), bool)
    expected[0, 0, 0] = expected[0, 0, 1] = True
    np.testing.assert_array_equal(small.occlusion, expected)
    strict = ClipFlow(zero, zero, occluded).resized(4, 6, occluded_fraction=0.9)
    assert strict.occlusion.sum() == 1


def test_resized_many_matches_resized():
    rng = np.random.default_rng(0)
    forward = cv2.GaussianBlur(rng.normal(0, 6, (64, 80, 6)).astype(np.float32), (0, 0), 3).reshape(
        64, 80, 3, 2
    )
    forward = np.ascontiguousarray(forward.transpose(2, 0, 1, 3))  # (3, 64, 80, 2)
    flow = ClipFlow(forward, -forward, rng.random((3, 64, 80)) < 0.3)
    sizes = [(16, 20), (8, 10), (4, 5), (3, 7)]
    many = flow.resized_many(sizes)
    assert set(many) == set(sizes)
    for height, width in sizes:
        one = flow.resized(height, width)
        np.testing.assert_allclose(many[(height, width)].forward, one.forward, atol=1e-5)
        np.testing.assert_allclose(many[(height, width)].backward, one.backward, atol=1e-5)
        np.testing.assert_array_equal(many[(height, width)].occlusion, one.occlusion)


def test_clip_flow_checks_shapes():
    with pytest.raises(ValueError, match="disagree"):
        ClipFlow(
            np.zeros((1, 4, 4, 2), np.float32), np.zeros((1, 4, 5, 2), np.float32), np.zeros((1, 4, 4), bool)
        )
