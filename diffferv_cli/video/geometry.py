"""Pure frame geometry: working size, frame selection, padding and cropping, back to source size.

Nothing here runs ffmpeg or reads a file; `io.read_clip` and `io.write_video` apply these maps.

* **Working size** (`working_geometry`): scale so the short side is `spec.short_side`, keeping the
  aspect ratio, then round the long side *up* to a multiple of `spec.multiple` by padding both sides
  equally with mirrored content. Padding never loses source pixels, is undone exactly on output, and
  costs at most one extra row of tiles; `Geometry.crop` records it as negative numbers. (Positive,
  i.e. cropped, geometries are also undone, by mirroring the edge back, but `working_geometry` never
  makes them.)
* **Frame selection** (`frame_selection`): source frame numbers `start, start + stride, ...`, counted
  from 0 in display order. `SourceFrames` records such a selection in a derived video, and
  `SourceFrames.then` composes two selections (a selection of a selection is one arithmetic
  progression of source frames).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from diffferv_cli.config import ClipSpec
from diffferv_cli.errors import UserError

MAX_ASPECT = 8.0  # longer / shorter side; beyond this the working size would be absurd


@dataclass(frozen=True)
class Geometry:
    """How source frames map to working frames: aspect-keeping resize, then a centered crop (>0) or
    pad (<0) per side. `working_geometry` only pads (with mirrored content)."""

    source_size: tuple[int, int]  # (width, height) as displayed
    working_size: tuple[int, int]  # (width, height), both multiples of spec.multiple
    scaled_size: tuple[int, int]  # after the aspect-keeping resize, before crop/pad
    crop: tuple[int, int, int, int]  # (left, top, right, bottom): cropped (>0) or padded (<0)


def _round_half_up(value: float) -> int:
    return int(math.floor(value + 0.5))


def working_geometry(source_size: tuple[int, int], spec: ClipSpec) -> Geometry:
    """Short side -> spec.short_side (aspect kept), long side padded up to a multiple of spec.multiple,
    the padding split evenly (left/top get the smaller half)."""
    width, height = (int(side) for side in source_size)
    if width < 1 or height < 1:
        raise ValueError(f"invalid frame size {source_size}")
    if max(width, height) / min(width, height) > MAX_ASPECT:
        raise UserError(f"Frames of {width}x{height} are too elongated (aspect ratio above {MAX_ASPECT:g}:1).")
    scale = spec.short_side / min(width, height)
    scaled = (spec.short_side if width <= height else _round_half_up(width * scale),
              spec.short_side if height < width else _round_half_up(height * scale))
    working = tuple(-(-side // spec.multiple) * spec.multiple for side in scaled)
    pad_x, pad_y = working[0] - scaled[0], working[1] - scaled[1]
    crop = (-(pad_x // 2), -(pad_y // 2), -(pad_x - pad_x // 2), -(pad_y - pad_y // 2))
    return Geometry(source_size=(width, height), working_size=working, scaled_size=scaled, crop=crop)


def frame_selection(frame_count: int, spec: ClipSpec, *, name: str = "the video") -> tuple[int, ...]:
    """Source frame numbers chosen by spec.start / spec.frames / spec.stride; empty is a `UserError`."""
    indices = tuple(range(spec.start, frame_count, spec.stride))
    if spec.frames is not None:
        indices = indices[:spec.frames]
    if not indices:
        raise UserError(f"No frames selected: --start {spec.start} is past the end of {name}, which has "
                        f"{frame_count} frame{'s' if frame_count != 1 else ''} (0..{frame_count - 1}).")
    return indices


def check_region(region: tuple[int, int, int, int] | None, frame_size: tuple[int, int]):
    """`region` (x, y, width, height) if it lies inside the displayed frame; a `UserError` if not."""
    if region is None:
        return None
    x, y, width, height = region
    if x + width > frame_size[0] or y + height > frame_size[1]:
        raise UserError(f"The region {x},{y},{width},{height} (x,y,width,height) reaches past the "
                        f"{frame_size[0]}x{frame_size[1]} frame.")
    return (x, y, width, height)


@dataclass(frozen=True)
class SourceFrames:
    """Which frames of a source video a derived video holds: its frame j is source frame
    `start + j * stride`, for j < `count`. `source_count` is how many frames the source had."""

    start: int
    stride: int
    count: int
    source_count: int | None = None

    def __post_init__(self) -> None:
        if self.start < 0 or self.stride < 1 or self.count < 1:
            raise ValueError(f"invalid source frames {self}")

    @classmethod
    def of(cls, indices: tuple[int, ...], source_count: int | None = None) -> SourceFrames:
        """From selected frame numbers, which must be evenly spaced (what `frame_selection` gives)."""
        stride = indices[1] - indices[0] if len(indices) > 1 else 1
        if any(b - a != stride for a, b in zip(indices, indices[1:], strict=False)) or stride < 1:
            raise ValueError(f"frame numbers are not evenly spaced: {indices[:8]}")
        return cls(start=indices[0], stride=stride, count=len(indices), source_count=source_count)

    def then(self, start: int, stride: int, count: int) -> SourceFrames:
        """Frames `start, start + stride, ...` (`count` of them) of the derived video, as source frames."""
        return SourceFrames(start=self.start + start * self.stride, stride=self.stride * stride, count=count,
                            source_count=self.source_count)

    @property
    def indices(self) -> tuple[int, ...]:
        return tuple(range(self.start, self.start + self.stride * self.count, self.stride))


# Padding and cropping ------------------------------------------------------------------------------

def scaled_to_working(frames: np.ndarray, crop: tuple[int, int, int, int]) -> np.ndarray:
    """Apply a Geometry's crop (>0) / mirrored pad (<0) to (..., H, W, 3) frames."""
    left, top, right, bottom = crop
    height, width = frames.shape[-3:-1]
    frames = frames[..., max(top, 0):height - max(bottom, 0), max(left, 0):width - max(right, 0), :]
    pads = [(0, 0)] * (frames.ndim - 3) + [(max(-top, 0), max(-bottom, 0)), (max(-left, 0), max(-right, 0)), (0, 0)]
    return np.pad(frames, pads, mode="reflect") if any(any(p) for p in pads) else frames


def working_to_scaled(frames: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Undo the crop/pad: back to the scaled size (a crop is undone by mirroring the edge back)."""
    return scaled_to_working(frames, tuple(-side for side in geometry.crop))


def to_source_resolution(frames: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Working-size frames (m, H, W, 3) or one frame (H, W, 3) -> source size: undo the crop/pad, then
    resize (cv2.INTER_AREA when shrinking, INTER_CUBIC when enlarging). Holds all frames at source size
    in memory; `write_video(..., geometry=...)` does the resize inside ffmpeg instead."""
    import cv2

    working_width, working_height = geometry.working_size
    if frames.shape[-3:-1] != (working_height, working_width):
        raise ValueError(f"frames are {frames.shape[-2]}x{frames.shape[-3]}, geometry expects "
                         f"{working_width}x{working_height}")
    scaled = working_to_scaled(frames, geometry)
    width, height = geometry.source_size
    if geometry.scaled_size == geometry.source_size:
        return np.ascontiguousarray(scaled)
    shrinking = width <= geometry.scaled_size[0] and height <= geometry.scaled_size[1]
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC
    single = scaled.ndim == 3
    stack = scaled[None] if single else scaled
    resized = np.stack([cv2.resize(np.ascontiguousarray(frame), (width, height), interpolation=interpolation)
                        for frame in stack])
    return resized[0] if single else resized
