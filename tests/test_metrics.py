"""Metric functions against values computed by hand on small arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest

from diffferv_cli.evaluation import metrics


def _e(axis: int, length: float) -> np.ndarray:
    vector = np.zeros(128)
    vector[axis] = length
    return vector


# Reconstruction -----------------------------------------------------------------------------------


def test_mse_and_psnr_on_known_images():
    black = np.zeros((2, 4, 4, 3), np.uint8)
    grey = np.full((2, 4, 4, 3), 51, np.uint8)  # 51/255 = 0.2
    assert metrics.mse(black, grey) == pytest.approx(0.04)  # 0.2^2, in [0, 1] units
    assert metrics.psnr(black, grey) == pytest.approx(10 * math.log10(25))  # 13.98 dB

    half = black.copy()
    half[:, :2] = 51  # half of the pixels off by 0.2 -> MSE 0.02
    assert metrics.mse_per_frame(black, half) == pytest.approx([0.02, 0.02])
    assert metrics.psnr(black, half) == pytest.approx(10 * math.log10(50))


def test_psnr_of_identical_frames_is_capped():
    frames = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    assert metrics.mse(frames, frames) == 0.0
    assert metrics.psnr(frames, frames) == metrics.PSNR_CAP_DB == 100.0
    # per-frame mean: one identical frame at the cap, one at 13.98 dB
    mixed = frames.copy()
    mixed[1] = np.clip(mixed[1].astype(int) + 51, 0, 255).astype(np.uint8)
    assert metrics.psnr_per_frame(frames, mixed)[0] == 100.0
    assert metrics.psnr_per_frame(frames, mixed)[1] < 100.0


def test_ssim_identical_is_one_and_distortion_lowers_it():
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    assert metrics.ssim(frames, frames) == pytest.approx(1.0)
    mild = np.clip(frames + rng.normal(0, 8, frames.shape), 0, 255).astype(np.uint8)
    strong = np.clip(frames + rng.normal(0, 40, frames.shape), 0, 255).astype(np.uint8)
    assert 1.0 > metrics.ssim(frames, mild) > metrics.ssim(frames, strong)
    assert metrics.ssim_per_frame(frames, mild).shape == (2,)


def _reference_ssim(a: np.ndarray, b: np.ndarray, window) -> float:
    """SSIM of two grey [0, 1] images written out from Wang et al. 2004: weighted local statistics in a
    normalised window at every pixel whose window lies inside the image, averaged. No filtering library."""
    c1, c2 = 0.01**2, 0.03**2
    size = window.shape[0]
    values = []
    for y in range(a.shape[0] - size + 1):
        for x in range(a.shape[1] - size + 1):
            pa, pb = a[y:y + size, x:x + size], b[y:y + size, x:x + size]
            mean_a, mean_b = (window * pa).sum(), (window * pb).sum()
            var_a = (window * (pa - mean_a) ** 2).sum()
            var_b = (window * (pb - mean_b) ** 2).sum()
            cov = (window * (pa - mean_a) * (pb - mean_b)).sum()
            values.append((2 * mean_a * mean_b + c1) * (2 * cov + c2)
                          / ((mean_a**2 + mean_b**2 + c1) * (var_a + var_b + c2)))
    return float(np.mean(values))


def _gaussian_window(sigma: float = 1.5, radius: int = 5) -> np.ndarray:
    offsets = np.arange(-radius, radius + 1)
    profile = np.exp(-(offsets**2) / (2 * sigma**2))
    window = np.outer(profile, profile)
    return window / window.sum()  # 11x11, sigma 1.5: Wang et al.'s window


def test_ssim_equals_wang_et_al_gaussian_window_reference():
    """Per frame and channel, SSIM is Wang et al.'s: an 11x11 Gaussian window (sigma 1.5), population
    covariances, K1 0.01, K2 0.03, channels averaged; on non-square frames. A uniform 7x7 window (the
    scikit-image default) gives values that differ by far more than the tolerance."""
    rng = np.random.default_rng(7)
    height, width = 20, 27
    smooth = np.cumsum(np.cumsum(rng.normal(size=(2, height, width, 3)), axis=1), axis=2)
    smooth = (smooth - smooth.min()) / (smooth.max() - smooth.min())
    source = np.round(smooth * 255).astype(np.uint8)
    edited = np.clip(source + rng.normal(0, 20, source.shape), 0, 255).astype(np.uint8)
    gaussian, uniform = _gaussian_window(), np.full((7, 7), 1 / 49)
    expected = [np.mean([_reference_ssim(source[f, ..., c] / 255, edited[f, ..., c] / 255, gaussian)
                         for c in range(3)]) for f in range(2)]
    uniform_values = [np.mean([_reference_ssim(source[f, ..., c] / 255, edited[f, ..., c] / 255, uniform)
                               for c in range(3)]) for f in range(2)]
    assert metrics.ssim_per_frame(source, edited) == pytest.approx(expected, abs=1e-9)
    assert metrics.ssim(source, edited) == pytest.approx(np.mean(expected), abs=1e-9)
    assert metrics.ssim_per_frame(source[0], edited[0]) == pytest.approx(expected[:1], abs=1e-9)  # one frame
    assert min(abs(u - e) for u, e in zip(uniform_values, expected, strict=True)) > 1e-3


def test_pixel_metrics_reject_different_shapes():
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.mse(np.zeros((1, 4, 4, 3), np.uint8), np.zeros((1, 4, 5, 3), np.uint8))


def test_lpips_is_unavailable_rather_than_faked():
    from diffferv_cli.models.auxiliary import load_lpips

    model, reason = load_lpips()
    if model is None:  # here: lpips / torchvision do not import
        assert reason
        frames = np.zeros((1, 8, 8, 3), np.uint8)
        result = metrics.lpips_per_frame(frames, frames)
        assert isinstance(result, metrics.Unavailable)
        assert str(result).startswith("unavailable: ")


# Identity -------------------------------------------------------------------------------------------

# Source descriptors along one axis: adjacent distances 0.2, 0.2; all pairs 0.2, 0.4, 0.2.
SOURCE = np.stack([_e(0, 0.0), _e(0, 0.2), _e(0, 0.4)])
# Edited: adjacent distances 0.3, 0.4; all pairs 0.3, 0.5, 0.4.
EDITED = np.stack([_e(0, 0.0), _e(0, 0.3), _e(0, 0.3) + _e(1, 0.4)])


def test_similarity_kinds():
    assert metrics.similarity(_e(0, 1), _e(1, 1)) == pytest.approx(1 - math.sqrt(2))
    assert metrics.similarity(_e(0, 1), _e(1, 1), "cosine") == pytest.approx(0.0)
    assert metrics.similarity(_e(0, 2), _e(0, 1), "cosine") == pytest.approx(1.0)
    with pytest.raises(ValueError):
        metrics.similarity(_e(0, 1), _e(0, 1), "arcface")


def test_idp_tl_id_tg_id_by_hand():
    # IDP: sims 1 - 0, 1 - 0.1, 1 - sqrt(0.1^2 + 0.4^2)
    assert metrics.identity_preservation(SOURCE, EDITED) == pytest.approx((1 + 0.9 + 1 - math.sqrt(0.17)) / 3)
    # TL-ID: edited adjacent mean (0.7 + 0.6) / 2 over source (0.8 + 0.8) / 2
    assert metrics.temporal_local_identity(SOURCE, EDITED) == pytest.approx(0.65 / 0.8)
    # TG-ID: edited all-pairs mean (0.7 + 0.5 + 0.6) / 3 over source (0.8 + 0.6 + 0.8) / 3
    assert metrics.temporal_global_identity(SOURCE, EDITED) == pytest.approx(0.6 / (2.2 / 3))
    # the source against itself is perfectly consistent by definition
    assert metrics.temporal_local_identity(SOURCE, SOURCE) == pytest.approx(1.0)
    assert metrics.temporal_global_identity(SOURCE, SOURCE) == pytest.approx(1.0)


def test_identity_metrics_skip_frames_without_a_face():
    source = [SOURCE[0], None, SOURCE[1], SOURCE[2]]
    edited = [EDITED[0], EDITED[1], EDITED[1], EDITED[2]]
    scores = metrics.identity_metrics(source, edited)
    assert (scores.frames_used, scores.frames_without_face_source, scores.frames_without_face_edited) == (3, 1, 0)
    # kept frames 0, 2, 3: only (2, 3) are adjacent in the video -> TL-ID uses that pair alone
    tl_expected = metrics.similarity(EDITED[1], EDITED[2]) / metrics.similarity(SOURCE[1], SOURCE[2])
    assert scores.tl_id == pytest.approx(tl_expected)
    kept_source, kept_edited = SOURCE, np.stack([EDITED[0], EDITED[1], EDITED[2]])
    assert scores.tg_id == pytest.approx(metrics.temporal_global_identity(kept_source, kept_edited))
    assert scores.idp == pytest.approx(metrics.identity_preservation(kept_source, kept_edited))


def test_identity_metrics_without_any_face():
    scores = metrics.identity_metrics([None] * 4, [None] * 4)
    assert scores.frames_used == 0
    for value in (scores.idp, scores.tl_id, scores.tg_id):
        assert isinstance(value, metrics.Unavailable)
        assert "no face found in 4 frames" in str(value)


# Temporal -------------------------------------------------------------------------------------------


def _shifted_clip(dx: int, dy: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two frames where frame 1 is frame 0 moved by (dx, dy), the exact flow, and its out-of-frame mask."""
    height, width = 16, 20
    frame0 = np.random.default_rng(2).integers(0, 256, (height, width, 3), dtype=np.uint8)
    frame1 = np.roll(frame0, (dy, dx), axis=(0, 1))  # frame1(p + (dx, dy)) = frame0(p); edges wrap
    forward = np.zeros((1, height, width, 2), np.float32)
    forward[..., 0], forward[..., 1] = dx, dy
    yy, xx = np.mgrid[0:height, 0:width]
    outside = (xx + dx > width - 1) | (yy + dy > height - 1) | (xx + dx < 0) | (yy + dy < 0)
    return np.stack([frame0, frame1]), forward, outside[None]


def test_warping_error_is_zero_for_a_clip_that_follows_its_flow():
    frames, forward, occlusion = _shifted_clip(dx=3, dy=1)
    error = metrics.flow_warping_error(frames, forward, occlusion)
    assert error.mse == 0.0 and error.mae == 0.0
    assert error.valid_fraction == pytest.approx(1 - occlusion.mean())
    # the wrong direction (or a frame that does not follow) is penalised
    reversed_flow = metrics.flow_warping_error(frames, -forward, occlusion)
    assert reversed_flow.mse > 0.01


def test_warping_error_by_hand():
    frames, forward, occlusion = _shifted_clip(dx=0, dy=0)
    frames[1] = np.clip(frames[1].astype(int) + 51, 0, 255)  # brighter where not saturated
    expected = np.square((frames[1].astype(float) - frames[0]) / 255).mean()
    assert metrics.flow_warping_error(frames, forward, occlusion).mse == pytest.approx(expected)


def test_warping_error_rejects_mismatched_flow():
    frames, forward, occlusion = _shifted_clip(1, 1)
    with pytest.raises(ValueError, match="do not fit"):
        metrics.flow_warping_error(frames[:, :8], forward, occlusion)


# Attributes and CLIP-IQA ----------------------------------------------------------------------------


def test_attribute_rates_by_hand():
    labels = ["Smiling", "Eyeglasses", "Young"]
    source = np.array([[0, 0, 1], [0, 1, 1], [1, 0, 1], [0, 0, 0]], bool)
    edited = np.array([[1, 0, 1], [1, 1, 0], [1, 0, 1], [1, 1, 0]], bool)
    rates = metrics.attribute_rates(source, edited, labels, "Smiling")
    assert rates.tacr == pytest.approx(3 / 4)  # frames 0, 1, 3 changed "Smiling"
    assert rates.napr == pytest.approx(6 / 8)  # (frame 1 Young), (frame 3 Eyeglasses) changed
    with pytest.raises(ValueError):
        metrics.attribute_rates(source, edited, labels, "Bald")


def test_clip_iqa_softmax():
    assert metrics.clip_iqa_from_similarities(np.array([0.25]), np.array([0.25])) == pytest.approx([0.5])
    expected = 1 / (1 + math.exp(-100 * 0.1))
    assert metrics.clip_iqa_from_similarities(np.array([0.3]), np.array([0.2])) == pytest.approx([expected])


# Edges and conventions --------------------------------------------------------------------------------


def test_to_unit_scales_uint8_and_keeps_floats_as_float64():
    converted = metrics.to_unit(np.array([0, 51, 255], np.uint8))
    assert converted.dtype == np.float64 and converted.tolist() == [0.0, 0.2, 1.0]
    floats = metrics.to_unit(np.array([0.25, 0.5], np.float32))
    assert floats.dtype == np.float64 and floats.tolist() == [0.25, 0.5]


def test_psnr_of_identical_frames_warns_nothing():
    import warnings

    frames = np.zeros((2, 4, 4, 3), np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert metrics.psnr(frames, frames) == 100.0


def _cosine(a, b):  # written out, one pair at a time
    return sum(x * y for x, y in zip(a, b, strict=True)) / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def test_identity_metrics_with_cosine_similarity_by_hand():
    rng = np.random.default_rng(5)
    source, edited = rng.normal(size=(4, 128)), rng.normal(size=(4, 128))
    rows = metrics.similarity(source, edited, "cosine")
    assert rows.shape == (4,)
    assert rows == pytest.approx([_cosine(s, e) for s, e in zip(source, edited, strict=True)])
    idp = np.mean([_cosine(e, s) for s, e in zip(source, edited, strict=True)])
    adjacent = [np.mean([_cosine(d[i], d[i + 1]) for i in range(3)]) for d in (source, edited)]
    pairs = [np.mean([_cosine(d[i], d[j]) for i in range(4) for j in range(i + 1, 4)]) for d in (source, edited)]
    scores = metrics.identity_metrics(list(source), list(edited), kind="cosine")
    assert scores.idp == pytest.approx(idp)
    assert scores.tl_id == pytest.approx(adjacent[1] / adjacent[0])
    assert scores.tg_id == pytest.approx(pairs[1] / pairs[0])
    assert metrics.identity_preservation(source, edited, "cosine") == pytest.approx(idp)
    assert metrics.adjacent_similarity(edited, "cosine") == pytest.approx(adjacent[1])
    assert metrics.all_pairs_similarity(edited, "cosine") == pytest.approx(pairs[1])
    assert metrics.identity_metrics(list(source), list(edited)).idp == pytest.approx(
        np.mean([1 - np.linalg.norm(e - s) for s, e in zip(source, edited, strict=True)]))  # dlib by default


def test_identity_metrics_with_too_few_faces_say_why():
    one = metrics.identity_metrics([SOURCE[0], None, None], [EDITED[0], EDITED[1], None])
    assert one.idp == pytest.approx(1.0) and (one.frames_used, one.frames_without_face_source,
                                              one.frames_without_face_edited) == (1, 2, 1)
    assert str(one.tl_id) == "unavailable: no two adjacent frames with a face"
    assert str(one.tg_id) == "unavailable: fewer than two frames with a face"
    apart = metrics.identity_metrics([SOURCE[0], None, SOURCE[2]], [EDITED[0], EDITED[1], EDITED[2]])
    assert isinstance(apart.tl_id, metrics.Unavailable) and not isinstance(apart.tg_id, metrics.Unavailable)
    edited_only = metrics.identity_metrics([SOURCE[0], SOURCE[1]], [None, None])
    assert str(edited_only.idp) == "unavailable: no frame with a face on both sides (of 2)"
    with pytest.raises(ValueError, match="differ in length"):
        metrics.identity_metrics([SOURCE[0]], [EDITED[0], EDITED[1]])
    assert math.isnan(metrics.adjacent_similarity(SOURCE[:1])) and math.isnan(metrics.all_pairs_similarity(SOURCE[:1]))


def test_warp_samples_bilinearly_and_zero_outside():
    row = np.array([[[0.0], [1.0], [3.0], [7.0]]])  # (1, 4, 1) float: not rescaled
    half = np.zeros((1, 4, 2), np.float32)
    half[..., 0] = 0.5  # half a pixel to the right
    assert metrics.warp_to_previous(row, half)[0, :3, 0].tolist() == [0.5, 2.0, 5.0]
    whole = np.zeros((1, 4, 2), np.float32)
    whole[..., 0] = -1  # one pixel to the left: the first pixel samples outside
    assert metrics.warp_to_previous(row, whole)[0, :, 0].tolist() == [0.0, 0.0, 1.0, 3.0]
    grey = np.array([[[51, 102, 153]]], np.uint8)  # uint8 is scaled to [0, 1]
    assert metrics.warp_to_previous(grey, np.zeros((1, 1, 2), np.float32)).tolist() == [[[0.2, 0.4, 0.6]]]


def test_warping_error_mae_pairs_and_occlusion_by_hand():
    frames = np.zeros((3, 2, 2, 3), np.uint8)
    frames[1] = 51  # pair 0: |0 - 0.2| everywhere; pair 1: |0.2 - 0.6| where not occluded
    frames[2] = 153
    forward = np.zeros((2, 2, 2, 2), np.float32)
    occlusion = np.zeros((2, 2, 2), bool)
    occlusion[1, 0] = True  # half of pair 1 occluded
    error = metrics.flow_warping_error(frames, forward, occlusion)
    assert error.per_pair_mse == pytest.approx([0.04, 0.16])
    assert error.mse == pytest.approx(0.10) and error.mae == pytest.approx(0.30)
    assert error.valid_fraction == pytest.approx(6 / 8)
    occlusion[1] = True  # a pair with nothing visible is left out of the mean
    error = metrics.flow_warping_error(frames, forward, occlusion)
    assert math.isnan(error.per_pair_mse[1]) and error.mse == pytest.approx(0.04) and error.mae == pytest.approx(0.2)
    with pytest.raises(ValueError, match="two frames"):
        metrics.flow_warping_error(frames[:1], forward[:0], occlusion[:0])


def test_attribute_rates_with_a_single_attribute_and_frame_count():
    rates = metrics.attribute_rates(np.array([[0], [1]]), np.array([[1], [1]]), ["Smiling"], "Smiling")
    assert rates.tacr == 0.5 and math.isnan(rates.napr) and rates.frames == 2


def test_clip_iqa_per_frame_scale_and_no_overflow():
    values = metrics.clip_iqa_from_similarities(np.array([0.3, 0.2, 0.9]), np.array([0.2, 0.3, 0.1]), logit_scale=10)
    assert values == pytest.approx([1 / (1 + math.exp(-1)), 1 / (1 + math.exp(1)), 1 / (1 + math.exp(-8))])
    assert metrics.clip_iqa_from_similarities(np.array([9.0]), np.array([0.0]), logit_scale=1000)[0] == 1.0
    # frames whose logits differ by thousands are each stabilised on their own (no 0/0 for the second)
    mixed = metrics.clip_iqa_from_similarities(np.array([9.0, 0.0]), np.array([0.0, 0.001]), logit_scale=1000)
    assert mixed == pytest.approx([1.0, 1 / (1 + math.exp(1))])


def test_lpips_loader_names_what_is_missing(tmp_path, monkeypatch):
    import importlib.util
    import sys
    import types

    import torch

    from diffferv_cli.models import auxiliary as components

    real_find_spec = importlib.util.find_spec
    components.load_lpips.cache_clear()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lpips" else real_find_spec(name, *a))
    assert "not installed" in components.load_lpips()[1]
    components.load_lpips.cache_clear()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "lpips" else real_find_spec(name, *a))
    monkeypatch.setitem(sys.modules, "lpips", None)  # import fails
    assert "does not import (ModuleNotFoundError" in components.load_lpips()[1]
    components.load_lpips.cache_clear()
    module = types.ModuleType("lpips")
    module.LPIPS = lambda net, verbose: types.SimpleNamespace(eval=lambda: "model")
    monkeypatch.setitem(sys.modules, "lpips", module)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    model, reason = components.load_lpips()
    assert model is None and str(tmp_path / "checkpoints") in reason
    assert isinstance(metrics.lpips_per_frame(np.zeros((1, 4, 4, 3), np.uint8), np.zeros((1, 4, 4, 3), np.uint8)),
                      metrics.Unavailable)
    components.load_lpips.cache_clear()
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / components.ALEXNET_WEIGHTS).write_bytes(b"")
    assert components.load_lpips() == ("model", None)
    components.load_lpips.cache_clear()


def test_lpips_feeds_minus_one_to_one_images_per_frame(monkeypatch):
    """With a stand-in LPIPS model (mean absolute difference): inputs are (1, 3, H, W) in [-1, 1]."""

    seen = []

    class StandIn:
        def __init__(self, net, verbose):
            assert net == "alex"

        def eval(self):
            return self

        def __call__(self, first, second):
            seen.append((tuple(first.shape), float(first.min()), float(first.max())))
            return (first - second).abs().mean().reshape(1, 1, 1, 1)

    from diffferv_cli.models import auxiliary as components

    monkeypatch.setattr(components, "load_lpips", lambda: (StandIn("alex", False).eval(), None))
    source = np.zeros((2, 3, 5, 3), np.uint8)
    edited = source.copy()
    edited[1] = 255
    values = metrics.lpips_per_frame(source, edited)
    assert values.tolist() == pytest.approx([0.0, 2.0])
    assert seen[0] == ((1, 3, 3, 5), -1.0, -1.0)
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.lpips_per_frame(source, edited[:, :2])


# Exact messages, defaults and dtypes -------------------------------------------------------------------


def test_unknown_similarity_and_attribute_are_named():
    with pytest.raises(ValueError, match=r"^unknown similarity 'arcface'; use 'dlib' or 'cosine'$"):
        metrics.similarity(_e(0, 1), _e(0, 1), "arcface")
    with pytest.raises(ValueError, match=r"^target attribute 'Bald' is not one of \['Smiling', 'Young'\]$"):
        metrics.attribute_rates(np.zeros((1, 2), bool), np.zeros((1, 2), bool), ["Smiling", "Young"], "Bald")
    with pytest.raises(ValueError, match=r"^the warping error needs at least two frames$"):
        metrics.flow_warping_error(np.zeros((1, 2, 2, 3), np.uint8), np.zeros((0, 2, 2, 2), np.float32),
                                   np.zeros((0, 2, 2), bool))


def test_pair_similarities_default_to_dlib_and_a_single_pair_counts():
    two = SOURCE[:2]  # one pair, distance 0.2
    assert metrics.all_pairs_similarity(two) == pytest.approx(0.8)
    assert metrics.adjacent_similarity(two) == pytest.approx(0.8)
    assert metrics.all_pairs_similarity(SOURCE) == pytest.approx(2.2 / 3)


def test_tl_id_uses_the_same_adjacent_pairs_on_both_sides():
    """Both means run over the pairs `adjacent` keeps: source (0, 1) 0.8, edited (0, 1) 0.7."""
    adjacent = np.array([True, False])
    assert metrics.temporal_local_identity(SOURCE, EDITED, adjacent=adjacent) == pytest.approx(0.7 / 0.8)
    skewed = np.stack([_e(0, 0.0), _e(0, 0.2), _e(0, 1.0)])  # its second pair (0.2) differs from the first
    assert metrics.temporal_local_identity(skewed, EDITED, adjacent=np.array([False, True])) == pytest.approx(0.6 / 0.2)


def test_empty_means_are_nan_without_warnings():
    import warnings

    frames = np.zeros((2, 2, 2, 3), np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(metrics.adjacent_similarity(SOURCE, adjacent=np.array([False, False])))
        assert math.isnan(metrics.attribute_rates(np.ones((2, 1)), np.ones((2, 1)), ["Smiling"], "Smiling").napr)
        error = metrics.flow_warping_error(frames, np.zeros((1, 2, 2, 2), np.float32), np.ones((1, 2, 2), bool))
        assert math.isnan(error.per_pair_mse[0]) and error.valid_fraction == 0.0


def test_warp_interpolates_uint8_frames_without_rounding():
    row = np.array([[[0], [1], [3], [7]]], np.uint8)  # (1, 4, 1): halfway values are not whole levels
    half = np.zeros((1, 4, 2), np.float32)
    half[..., 0] = 0.5
    assert metrics.warp_to_previous(row, half)[0, :3, 0] * 255 == pytest.approx([0.5, 2.0, 5.0])


def test_attribute_predictions_are_taken_as_booleans():
    """Any non-zero prediction means the attribute is present: 2 and 1 are the same prediction."""
    rates = metrics.attribute_rates(np.array([[2, 0], [0, 3]]), np.array([[1, 0], [0, 1]]), ["Smiling", "Young"],
                                    "Smiling")
    assert (rates.tacr, rates.napr) == (0.0, 1.0)
    swapped = metrics.attribute_rates(np.array([[1, 0], [0, 1]]), np.array([[2, 0], [0, 3]]), ["Smiling", "Young"],
                                      "Smiling")
    assert (swapped.tacr, swapped.napr) == (0.0, 1.0)


def test_lpips_passes_on_why_it_is_unavailable(monkeypatch):
    from diffferv_cli.models import auxiliary as components

    monkeypatch.setattr(components, "load_lpips", lambda: (None, "the lpips package is not installed"))
    frames = np.zeros((1, 4, 4, 3), np.uint8)
    assert metrics.lpips_per_frame(frames, frames) == metrics.Unavailable("the lpips package is not installed")


def test_clip_iqa_computes_in_float64_and_keeps_leading_axes():
    positive, negative = np.array([0.3, 0.21], np.float16), np.array([0.2, 0.2], np.float16)
    expected = [1 / (1 + math.exp(-100 * (float(p) - float(n)))) for p, n in zip(positive, negative, strict=True)]
    assert metrics.clip_iqa_from_similarities(positive, negative) == pytest.approx(expected, rel=1e-12)
    grid_positive = np.array([[0.3, 0.2, 0.25], [0.1, 0.4, 0.2]])  # (clips, frames)
    grid_negative = np.array([[0.2, 0.3, 0.25], [0.2, 0.1, 0.3]])
    values = metrics.clip_iqa_from_similarities(grid_positive, grid_negative, logit_scale=10)
    assert values.shape == (2, 3)
    assert values == pytest.approx(1 / (1 + np.exp(-10 * (grid_positive - grid_negative))))
