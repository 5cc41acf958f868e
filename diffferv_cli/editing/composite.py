"""Back to source resolution, keeping the source's own pixels wherever the edit changed nothing.

The edit is made at working size (short side 512). Scaling it up to a 1080p or 4K source would turn
the whole frame, background included, into a blurred VAE round trip of itself. Instead, with

    S      the source frame at its own resolution (or the edited region's box of it),
    R      the VAE decode of the cached source latent z_0 (the working-size round trip of the input),
    E      the decoded edit, both at working size with the working pad removed,
    D      = E - R, the change the edit made,
    up(.)  the resize from the working size to the box's size in the source,

the output is

    M   = feather(ramp(lowpass(max_c |D|) / threshold))               at working size
    out = S + up(D) - up(M) * (S - up(R))  =  up(E) + (1 - up(M)) * (S - up(R))

`S - up(R)` is everything the source holds that the working-size round trip lost (its detail). Where
the edit changed little (M = 0) the output is the source plus the edit's change, so the source's own
detail survives; where it changed a lot (M = 1: new hair colour, glasses) the edit is taken as it is
and the source's detail under it is dropped. Where nothing changed (D = 0) the output *is* the source
frame, exactly. The mask M is the channel-wise largest |D| (0..1 scale), low-passed (Gaussian, sigma
`lowpass`) so that pixel noise of the decoder does not count, ramped smoothly from threshold/2 to
threshold (no hard switch that could flicker from frame to frame), dilated by 3 * `feather` so that the
whole changed area is covered, and blurred (sigma `feather`) so that no seam shows. `replace` mode is
`out = up(E)`, the working render scaled up.

With a region (a box of the frame edited on its own, `ClipSpec.region`) the same holds inside the box,
and the box joins the untouched frame around it through a ramp `border` working pixels wide on every
side that lies inside the frame: `frame = S + B * (box - S)`, B rising from 0 at the box's edge to 1.

All arithmetic is float32 with OpenCV resizes (area to shrink, bicubic to enlarge; the mask linear, so
it stays in [0, 1]), rounded to uint8 once at the end.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import cv2
import numpy as np

from diffferv_cli.config import CompositeConfig


def undo_pad(frames: np.ndarray, geometry) -> np.ndarray:
    """Working-size frames (..., H, W, C) -> the scaled size: the mirrored pad (negative `geometry.crop`)
    is cut off (a view); a crop (positive) is undone by mirroring the edge back."""
    left, top, right, bottom = geometry.crop
    height, width = frames.shape[-3:-1]
    if (width, height) != tuple(geometry.working_size):
        raise ValueError(f"frames are {width}x{height}, the geometry's working size is {geometry.working_size}")
    frames = frames[..., max(-top, 0):height - max(-bottom, 0), max(-left, 0):width - max(-right, 0), :]
    pads = [(0, 0)] * (frames.ndim - 3) + [(max(top, 0), max(bottom, 0)), (max(left, 0), max(right, 0)), (0, 0)]
    return np.pad(frames, pads, mode="reflect") if any(any(p) for p in pads) else frames


def resize(image: np.ndarray, size: tuple[int, int], *, linear: bool = False) -> np.ndarray:
    """`image` (h, w[, C]) to `size` (width, height) as float32: area averaging to shrink, bicubic to
    enlarge, bilinear when `linear` (no overshoot: a mask stays in [0, 1])."""
    image = np.ascontiguousarray(image, dtype=np.float32)
    height, width = image.shape[:2]
    if (width, height) == tuple(size):
        return image.copy()
    if linear:
        interpolation = cv2.INTER_LINEAR
    else:
        interpolation = cv2.INTER_AREA if size[0] <= width and size[1] <= height else cv2.INTER_CUBIC
    return cv2.resize(image, tuple(size), interpolation=interpolation)


def smoothstep(values: np.ndarray) -> np.ndarray:
    """3t^2 - 2t^3 of t clipped to [0, 1] (C1-continuous ramp, exactly 0 below 0 and 1 above 1)."""
    ramp = np.clip(values, 0.0, 1.0)
    return ramp * ramp * (3.0 - 2.0 * ramp)


def change_mask(delta: np.ndarray, config: CompositeConfig) -> np.ndarray:
    """(h, w) float32 in [0, 1]: where the change `delta` = E - R (h, w, 3; 0..255 scale) counts as large.

    Exactly 0 farther than the reach (3 * feather + OpenCV's blur radii: about 7 * feather + 4 * lowpass
    working pixels) from any
    pixel whose low-passed change exceeds threshold / 2."""
    magnitude = np.abs(delta, dtype=np.float32).max(axis=-1) / 255.0  # (h, w), 0..1
    if config.lowpass > 0:
        magnitude = cv2.GaussianBlur(magnitude, (0, 0), config.lowpass)
    half = config.threshold / 2.0
    mask = smoothstep((magnitude - half) / half).astype(np.float32)
    if config.feather > 0 and mask.any():
        radius = int(np.ceil(3 * config.feather))
        disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
        mask = cv2.GaussianBlur(cv2.dilate(mask, disk), (0, 0), config.feather)
        np.clip(mask, 0.0, 1.0, out=mask)
    return mask


def border_ramp(box: tuple[int, int, int, int], frame_size: tuple[int, int], width: float) -> np.ndarray:
    """(box h, box w) float32 weight of a box's own content against the frame around it: the product of
    one smoothstep per side, from 0 at the side to 1 at `width` pixels inside it (separable, so corners
    round off smoothly); a side on the frame's edge has no ramp."""
    x, y, box_width, box_height = box
    frame_width, frame_height = frame_size

    def ramp(length: int, low_open: bool, high_open: bool) -> np.ndarray:
        weight = np.ones(length, np.float32)
        if width <= 0:
            return weight
        distance = np.arange(length, dtype=np.float32) + 0.5  # from the low side, pixel centres
        if low_open:
            weight *= smoothstep(distance / width)
        if high_open:
            weight *= smoothstep(distance[::-1] / width)
        return weight

    rows = ramp(box_height, y > 0, y + box_height < frame_height)
    columns = ramp(box_width, x > 0, x + box_width < frame_width)
    return np.outer(rows, columns)


def to_uint8(frame: np.ndarray) -> np.ndarray:
    """Round to nearest and saturate."""
    return np.clip(np.rint(frame), 0, 255).astype(np.uint8)


def composite_frame(source: np.ndarray | None, edited: np.ndarray, reference: np.ndarray | None, geometry,
                    config: CompositeConfig, region: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """One output frame at source resolution, uint8 (H, W, 3).

    `source`: the full source frame (H, W, 3) uint8, upright (may be None only for `replace` without a
    region); `edited`, `reference`: E and R at working size (`reference` unused by `replace`);
    `geometry`: the clip's working geometry, which maps `region` (x, y, width, height; None = the
    whole frame) to the working size."""
    box_size = tuple(geometry.source_size)  # (width, height) of the region, or of the frame
    edited_scaled = undo_pad(edited, geometry)
    if source is None:
        if config.mode != "replace" or region is not None:
            raise ValueError("the source frame is needed for residual compositing and for regions")
        return to_uint8(resize(edited_scaled, box_size))
    x, y = (region[0], region[1]) if region is not None else (0, 0)
    box_source = source[y:y + box_size[1], x:x + box_size[0]].astype(np.float32)
    if box_source.shape[:2] != box_size[::-1]:
        raise ValueError(f"the region {region} does not fit the {source.shape[1]}x{source.shape[0]} source frame")

    if config.mode == "replace":
        inner = resize(edited_scaled, box_size)
    else:
        reference_scaled = undo_pad(reference, geometry)
        delta = edited_scaled.astype(np.float32) - reference_scaled.astype(np.float32)  # (h, w, 3), exact
        mask = change_mask(delta, config)
        inner = box_source + resize(delta, box_size)  # S + up(D)
        if mask.any():
            weight = resize(mask, box_size, linear=True)[..., None]  # up(M), (H, W, 1)
            inner -= weight * (box_source - resize(reference_scaled, box_size))  # - up(M) (S - up(R))

    whole_frame = region is None or (box_size == (source.shape[1], source.shape[0]))
    if whole_frame:
        return to_uint8(inner)
    scale = box_size[0] / geometry.scaled_size[0]  # source pixels per working pixel
    ramp = border_ramp((x, y, *box_size), (source.shape[1], source.shape[0]), config.border * scale)
    out = source.copy()
    out[y:y + box_size[1], x:x + box_size[0]] = to_uint8(box_source + ramp[..., None] * (inner - box_source))
    return out


def composite_frames(sources: Iterable[np.ndarray] | None, edited: np.ndarray, reference: np.ndarray | None,
                     geometry, config: CompositeConfig,
                     region: tuple[int, int, int, int] | None = None) -> Iterator[np.ndarray]:
    """`composite_frame` for a clip: `sources` yields the source frames (streamed, one at a time) that
    match `edited` (m, H, W, 3) frame for frame; None only for `replace` without a region."""
    if sources is None:
        for edited_frame in edited:
            yield composite_frame(None, edited_frame, None, geometry, config, region)
        return
    count = 0
    for index, source in enumerate(sources):
        if index >= len(edited):
            raise ValueError(f"more source frames than the {len(edited)} edited ones")
        yield composite_frame(source, edited[index], None if reference is None else reference[index], geometry,
                              config, region)
        count += 1
    if count != len(edited):
        raise ValueError(f"{count} source frames for {len(edited)} edited ones")


def needs_source(config: CompositeConfig, region) -> bool:
    """Whether compositing reads the source frames (everything except `replace` of the whole frame)."""
    return config.mode == "residual" or region is not None
