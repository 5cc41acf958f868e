"""editing/composite.py on synthetic frames: exactness where nothing changed, a changed patch, no seam,
region framing, against a slow float64 reference written from the formula's other form."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from diffferv_cli.config import ClipSpec, CompositeConfig
from diffferv_cli.editing.composite import (
    border_ramp,
    change_mask,
    composite_frame,
    composite_frames,
    undo_pad,
)
from diffferv_cli.video.geometry import scaled_to_working, working_geometry

SPEC = ClipSpec(short_side=64, multiple=16)
CONFIG = CompositeConfig()


def _random(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _working(image: np.ndarray, geometry) -> np.ndarray:
    """What read_clip makes of a source box: resize to the scaled size, then the mirrored pad."""
    scaled = cv2.resize(image, geometry.scaled_size, interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(scaled_to_working(scaled, geometry.crop))


def _smooth(height: int, width: int) -> np.ndarray:
    """A smooth frame (gradients of a few levels per pixel): seams stand out against it."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    red = 60 + 80 * xx / width + 20 * np.sin(yy / 9.0)
    green = 90 + 60 * yy / height + 20 * np.cos(xx / 11.0)
    blue = 120 + 30 * np.sin((xx + yy) / 13.0)
    return np.stack([red, green, blue], axis=-1).round().astype(np.uint8)


def reference_composite(source, edited, reference, geometry, config, region=None) -> np.ndarray:
    """The rule in its other form, float64, written out plainly: up(E) + (1 - up(M)) (S - up(R)) inside
    the box, then S + B (box - S), B the product of a smoothstep per box side inside the frame, pixel
    by pixel."""
    left, top, right, bottom = (-side for side in geometry.crop)  # the pad on each side
    height, width = edited.shape[:2]

    def unpadded(frame):
        return frame[top:height - bottom, left:width - right].astype(np.float64)

    box_width, box_height = geometry.source_size
    x, y = region[:2] if region else (0, 0)
    scaled_width = width - left - right
    grow = box_width >= scaled_width

    def up(image, linear=False):
        mode = cv2.INTER_LINEAR if linear else (cv2.INTER_CUBIC if grow else cv2.INTER_AREA)
        return cv2.resize(image, (box_width, box_height), interpolation=mode)

    box_source = source[y:y + box_height, x:x + box_width].astype(np.float64)
    if config.mode == "replace":
        inner = up(unpadded(edited))
    else:
        mask = change_mask(unpadded(edited) - unpadded(reference), config).astype(np.float64)
        inner = up(unpadded(edited)) + (1 - up(mask, linear=True)[..., None]) * (box_source - up(unpadded(reference)))
    out = source.astype(np.float64).copy()
    if region is None:
        return np.clip(np.rint(inner), 0, 255).astype(np.uint8)
    width_px = config.border * box_width / scaled_width
    def smoothstep(t):
        t = min(1.0, t / width_px) if width_px > 0 else 1.0
        return t * t * (3 - 2 * t)

    weight = np.ones((box_height, box_width))
    for row in range(box_height):
        for column in range(box_width):
            if x > 0:
                weight[row, column] *= smoothstep(column + 0.5)
            if x + box_width < source.shape[1]:
                weight[row, column] *= smoothstep(box_width - column - 0.5)
            if y > 0:
                weight[row, column] *= smoothstep(row + 0.5)
            if y + box_height < source.shape[0]:
                weight[row, column] *= smoothstep(box_height - row - 0.5)
    out[y:y + box_height, x:x + box_width] = box_source + weight[..., None] * (inner - box_source)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# Geometry --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [(96, 64), (100, 64), (65, 47), (47, 65), (64, 200), (40, 30)])
def test_undo_pad_inverts_the_working_pad(size):
    geometry = working_geometry(size, SPEC)
    scaled = _random((2, geometry.scaled_size[1], geometry.scaled_size[0], 3))
    working = scaled_to_working(scaled, geometry.crop)
    assert working.shape[1:3] == geometry.working_size[::-1]
    assert np.array_equal(undo_pad(working, geometry), scaled)


# Exactness ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [(160, 96), (100, 64), (65, 47), (47, 65), (64, 200), (40, 30)],
                         ids=["landscape", "padded", "odd", "odd-portrait", "tall", "smaller-than-working"])
def test_no_change_gives_the_source_exactly(size):
    """E == R: the source frame comes back bit for bit, however different R is from it."""
    geometry = working_geometry(size, SPEC)
    source = _random((size[1], size[0], 3), seed=1)
    reference = _random((geometry.working_size[1], geometry.working_size[0], 3), seed=2)
    out = composite_frame(source, reference.copy(), reference, geometry, CONFIG)
    assert out.dtype == np.uint8 and np.array_equal(out, source)
    replace = composite_frame(source, reference.copy(), reference, geometry, CONFIG.model_copy(update={"mode": "replace"}))
    assert not np.array_equal(replace, source)  # the old behaviour: the working render scaled up


def test_matches_the_slow_reference():
    for size in ((150, 100), (170, 100)):  # 96x64, no pad; 109x64 padded to 112x64
        geometry = working_geometry(size, SPEC)
        source = _smooth(size[1], size[0])
        reference = _random((geometry.working_size[1], geometry.working_size[0], 3), seed=3)
        edited = reference.copy()
        edited[20:40, 30:60] = _random((20, 30, 3), seed=4)  # a strong change
        edited[5:15, 70:80] = np.clip(edited[5:15, 70:80].astype(int) + 12, 0, 255)  # a weak one
        for mode in ("residual", "replace"):
            config = CONFIG.model_copy(update={"mode": mode})
            fast = composite_frame(source, edited, reference, geometry, config)
            slow = reference_composite(source, edited, reference, geometry, config)
            assert np.abs(fast.astype(int) - slow).max() <= 1, mode


def test_region_matches_the_slow_reference_and_keeps_the_outside():
    frame = _smooth(120, 200)
    region = (50, 30, 90, 60)
    geometry = working_geometry(region[2:], SPEC)
    reference = _random((geometry.working_size[1], geometry.working_size[0], 3), seed=5)
    edited = _random(reference.shape, seed=6)  # changed everywhere
    for mode in ("residual", "replace"):
        config = CONFIG.model_copy(update={"mode": mode})
        fast = composite_frame(frame, edited, reference, geometry, config, region)
        slow = reference_composite(frame, edited, reference, geometry, config, region)
        assert np.abs(fast.astype(int) - slow).max() <= 1, mode
        outside = np.ones(frame.shape[:2], bool)
        outside[30:90, 50:140] = False
        assert np.array_equal(fast[outside], frame[outside])
        assert np.abs(fast[45:75, 65:125].astype(int) - frame[45:75, 65:125]).mean() > 20  # edited inside


def test_region_on_the_frame_edge_has_no_ramp_there():
    ramp = border_ramp((0, 10, 40, 30), (100, 40), 8.0)  # touches the left and bottom edges
    assert ramp.shape == (30, 40)
    assert np.all(ramp[10:, :-8] == 1.0)  # left side and bottom rows: full weight up to the edge
    assert ramp[0, 20] < 0.05 and ramp[15, -1] < 0.05  # top and right sides ramp from ~0
    assert np.all(np.diff(ramp[15, 30:]) <= 0) and np.all(np.diff(ramp[:8, 20]) >= 0)
    assert np.array_equal(border_ramp((0, 0, 100, 40), (100, 40), 8.0), np.ones((40, 100), np.float32))


# The changed patch -------------------------------------------------------------------------------------

def _patch_case(config=CONFIG):
    """Source 420x300 -> 179x128 padded to 192x128. R = the working frame tinted by -40 (a VAE colour
    shift, so S - up(R) is large); E = R with a flat +120 patch."""
    size = (420, 300)
    geometry = working_geometry(size, ClipSpec(short_side=128, multiple=64))
    assert geometry.crop[0] < 0  # padded
    source = _smooth(size[1], size[0])
    reference = np.clip(_working(source, geometry).astype(int) - 40, 0, 255).astype(np.uint8)
    patch = (slice(50, 74), slice(80, 116))  # working pixels (rows, columns of the padded frame)
    edited = reference.copy()
    edited[patch] = np.clip(edited[patch].astype(int) + 120, 0, 255)
    out = composite_frame(source, edited, reference, geometry, config)
    return geometry, source, reference, edited, patch, out


def _source_zone(patch, geometry, grow: int, shape) -> np.ndarray:
    """Boolean (H, W) of the source pixels within `grow` working pixels of the patch."""
    left, top = -geometry.crop[0], -geometry.crop[1]
    scale = shape[1] / geometry.scaled_size[0]
    rows = (np.arange(shape[0]) + 0.5) / scale - 0.5 + top
    columns = (np.arange(shape[1]) + 0.5) / scale - 0.5 + left
    near_rows = (rows >= patch[0].start - grow) & (rows <= patch[0].stop - 1 + grow)
    near_columns = (columns >= patch[1].start - grow) & (columns <= patch[1].stop - 1 + grow)
    return near_rows[:, None] & near_columns[None, :]


def test_patch_change_outside_is_source_inside_is_the_edit():
    geometry, source, _, edited, patch, out = _patch_case()
    reach = int(np.ceil(7 * CONFIG.feather + 4 * CONFIG.lowpass)) + 3  # mask reach and cubic support
    outside = ~_source_zone(patch, geometry, reach, source.shape)
    assert outside.mean() > 0.5
    assert np.array_equal(out[outside], source[outside])
    inside = _source_zone(patch, geometry, -3, source.shape)
    assert inside.sum() > 500
    edit_up = cv2.resize(undo_pad(edited, geometry).astype(np.float32), geometry.source_size,
                         interpolation=cv2.INTER_CUBIC)
    assert np.abs(out[inside].astype(int) - np.clip(np.rint(edit_up[inside]), 0, 255)).max() <= 1


def test_patch_change_leaves_no_seam():
    """Across the mask's soft edge the output moves from S to up(E) = S - 40 + change: its gradient stays
    far below that contrast, while a hard switch between the same two images jumps by about all of it."""
    geometry, source, reference, edited, patch, out = _patch_case()
    mask = change_mask(undo_pad(edited, geometry).astype(np.float32) - undo_pad(reference, geometry), CONFIG)
    weight = cv2.resize(mask, geometry.source_size, interpolation=cv2.INTER_LINEAR)
    band = (weight > 0.02) & (weight < 0.98) & ~_source_zone(patch, geometry, 2, source.shape)
    assert band.sum() > 1000

    def steepest(image):
        image = image.astype(np.float64)
        across = np.abs(np.diff(image, axis=1)).max(axis=-1)
        down = np.abs(np.diff(image, axis=0)).max(axis=-1)
        return max(across[band[:, 1:] & band[:, :-1]].max(), down[band[1:] & band[:-1]].max())

    contrast = 40
    own = steepest(source)
    assert steepest(out) < own + contrast / 4
    up_edit = cv2.resize(undo_pad(edited, geometry).astype(np.float32), geometry.source_size, interpolation=cv2.INTER_CUBIC)
    hard = np.where((weight > 0.5)[..., None], up_edit, source.astype(np.float32))
    assert steepest(hard) > own + 0.75 * contrast


def test_weak_change_is_added_to_the_source():
    """Below threshold/2 the mask is exactly 0: the output is the source plus the upscaled change."""
    size = (160, 96)
    geometry = working_geometry(size, SPEC)
    source = _smooth(size[1], size[0])
    reference = _working(source, geometry)
    edited = np.clip(reference.astype(int) + 5, 0, 255).astype(np.uint8)  # 5 levels << 0.05 * 255
    delta = undo_pad(edited, geometry).astype(np.float32) - undo_pad(reference, geometry)
    assert not change_mask(delta, CONFIG).any()
    out = composite_frame(source, edited, reference, geometry, CONFIG)
    expected = source.astype(np.float32) + cv2.resize(delta, size, interpolation=cv2.INTER_CUBIC)
    assert np.array_equal(out, np.clip(np.rint(expected), 0, 255).astype(np.uint8))


def test_mask_ramps_with_the_change_and_is_bounded():
    config = CompositeConfig(lowpass=0.0, feather=0.0)
    levels = np.array([0.0, 0.04, 0.05, 0.075, 0.1, 0.5]) * 255  # threshold 0.1: ramp over 0.05..0.1
    delta = np.repeat(levels[None, :, None], 3, axis=2).astype(np.float32)  # (1, 6, 3)
    mask = change_mask(delta, config)[0]
    assert mask[0] == mask[1] == mask[2] == 0.0 and mask[4] == mask[5] == 1.0
    assert mask[3] == pytest.approx(0.5)
    single_channel = np.zeros((1, 1, 3), np.float32)
    single_channel[..., 2] = 200  # a change in one channel alone counts
    assert change_mask(single_channel, config)[0, 0] == 1.0
    spread = np.zeros((64, 64, 3), np.float32)
    spread[32, 32] = 255
    blurred = change_mask(spread, CompositeConfig(lowpass=0.0, feather=2.0))
    assert blurred.max() <= 1.0 and blurred[32, 32] > 0.98  # even a one-pixel change is covered
    # reach: dilation by 3 * feather = 6, then a Gaussian kernel of radius 4 * feather = 8 (OpenCV's size)
    assert blurred[32, 32 - 14] > 0 and not blurred[:, :32 - 14].any() and not blurred[32 + 15:].any()


def test_mask_edge_is_feathered_outside_the_change():
    """A hard-edged change: the mask is 1 over all of it and falls off outside it no faster than a
    Gaussian edge of sigma `feather` (max slope 1 / (sigma sqrt(2 pi)) ~ 0.1 per pixel at 4)."""
    step = np.zeros((32, 96, 3), np.float32)
    step[:, 48:] = 255
    mask = change_mask(step, CONFIG)
    assert mask[:, 48:].min() > 0.99
    assert np.abs(np.diff(mask, axis=1)).max() < 0.11
    assert mask[:, :48 - 7 * 4 - 8].max() == 0.0
    hard = change_mask(step, CONFIG.model_copy(update={"feather": 0.0}))
    assert np.abs(np.diff(hard, axis=1)).max() > 0.3  # what the feather prevents


def test_replace_without_a_region_needs_no_source():
    geometry = working_geometry((100, 64), SPEC)
    edited = _random((2, geometry.working_size[1], geometry.working_size[0], 3))
    replace = CONFIG.model_copy(update={"mode": "replace"})
    frames = list(composite_frames(None, edited, None, geometry, replace))
    assert [frame.shape for frame in frames] == [(64, 100, 3)] * 2
    with pytest.raises(ValueError, match="source frame is needed"):
        list(composite_frames(None, edited, edited, geometry, CONFIG))


def test_source_and_edit_counts_must_match():
    geometry = working_geometry((96, 64), SPEC)
    edited = _random((2, 64, 96, 3))
    with pytest.raises(ValueError, match="1 source frames for 2"):
        list(composite_frames(iter([_random((64, 96, 3))]), edited, edited, geometry, CONFIG))
