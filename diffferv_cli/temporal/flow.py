"""Optical flow between consecutive working frames, and occlusion from a forward-backward check (DESIGN 2).

Conventions (all arrays numpy, frames in working-size pixels):

* a flow is (H, W, 2) float32 `(dx, dy)`: pixel (x, y) of frame a moves to (x + dx, y + dy) in frame b;
* a clip of m frames has m - 1 forward flows (frame i -> i + 1) and m - 1 backward flows (i + 1 -> i);
* `occlusion[i]` marks the pixels of frame i that have no reliable match in frame i + 1.

The estimator sits behind `FlowEstimator` (a callable on two uint8 RGB frames); OpenCV's DIS is the default.
A learned estimator can be plugged in later without touching the trajectory code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Literal, Protocol

import cv2
import numpy as np

DISPreset = Literal["ultrafast", "fast", "medium"]

_DIS_PRESETS = {
    "ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
    "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
    "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM,
}

# Forward-backward consistency (Sundaram, Brox & Keutzer 2010; also UnFlow, RAFT-based video editors):
# a pixel is occluded when |f + b_warped|^2 > ALPHA * (|f|^2 + |b_warped|^2) + BETA  (pixels squared).
OCCLUSION_ALPHA = 0.01
OCCLUSION_BETA = 0.5


class FlowEstimator(Protocol):
    """Dense flow from frame a to frame b: two uint8 RGB (H, W, 3) frames -> (H, W, 2) float32 (dx, dy)."""

    name: str

    def __call__(self, frame_a: np.ndarray, frame_b: np.ndarray) -> np.ndarray: ...


class DISFlow:
    """OpenCV's Dense Inverse Search flow on the luma of the frames.

    One direction at 512x512 on this workplace's 2-core CPU (bench/bench_flow.py; end-point error on a
    known small rotation + zoom of a synthetic texture): ultrafast ~2 ms, 0.22 px; fast ~3 ms, 0.14 px;
    medium ~15 ms, 0.06 px (OFFLINE.md measured 0.54 / 0.21 px on a harder warp). Not thread-safe: one
    instance per thread (the OpenCV object keeps scratch buffers between calls)."""

    def __init__(self, preset: DISPreset = "medium") -> None:
        if preset not in _DIS_PRESETS:
            raise ValueError(f"unknown DIS preset {preset!r}; choose one of {sorted(_DIS_PRESETS)}")
        self.preset = preset
        self.name = f"dis-{preset}"
        self._dis = cv2.DISOpticalFlow_create(_DIS_PRESETS[preset])

    def __call__(self, frame_a: np.ndarray, frame_b: np.ndarray) -> np.ndarray:
        if frame_a.shape != frame_b.shape:
            raise ValueError(f"frames differ in shape: {frame_a.shape} vs {frame_b.shape}")
        flow = self._dis.calc(_luma(frame_a), _luma(frame_b), None)  # (H, W, 2) float32
        return np.ascontiguousarray(flow, dtype=np.float32)

    def __repr__(self) -> str:
        return f"DISFlow(preset={self.preset!r})"


def _luma(frame: np.ndarray) -> np.ndarray:
    if frame.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got {frame.dtype}")
    if frame.ndim == 2:
        return np.ascontiguousarray(frame)
    if frame.ndim == 3 and frame.shape[2] == 3:
        return cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY)
    raise ValueError(f"frames must be (H, W, 3) RGB or (H, W) gray, got {frame.shape}")


@dataclass(frozen=True)
class ClipFlow:
    """Forward/backward flow and forward occlusion of an m-frame clip (m - 1 pairs; m == 1 gives 0 pairs)."""

    forward: np.ndarray  # (m-1, H, W, 2) float32: frame i -> i+1, in pixels of this (H, W)
    backward: np.ndarray  # (m-1, H, W, 2) float32: frame i+1 -> i
    occlusion: np.ndarray  # (m-1, H, W) bool: pixel of frame i has no reliable match in frame i+1

    def __post_init__(self) -> None:
        object.__setattr__(self, "forward", np.asarray(self.forward, dtype=np.float32))
        object.__setattr__(self, "backward", np.asarray(self.backward, dtype=np.float32))
        object.__setattr__(self, "occlusion", np.asarray(self.occlusion, dtype=bool))
        if self.occlusion.ndim != 3:
            raise ValueError(f"occlusion must be (m-1, H, W), got {self.occlusion.shape}")
        pairs, height, width = self.occlusion.shape
        expected = (pairs, height, width, 2)
        if self.forward.shape != expected or self.backward.shape != expected:
            raise ValueError(
                f"flow shapes disagree: forward {self.forward.shape}, backward {self.backward.shape}, "
                f"occlusion {self.occlusion.shape}"
            )

    @property
    def frames(self) -> int:
        return self.occlusion.shape[0] + 1

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the flow fields."""
        return self.occlusion.shape[1], self.occlusion.shape[2]

    def resized(self, height: int, width: int, occluded_fraction: float = 0.5) -> ClipFlow:
        """The same flow on a (height, width) grid, e.g. a UNet token grid.

        Vectors are area-averaged (linear interpolation when enlarging) and scaled per axis, dx by
        width / W and dy by height / H, so they stay in units of the new grid's cells (frames need not be
        square). A cell is occluded when at least `occluded_fraction` of its area is: conservative, a
        token half covered by an occluded region is not trusted to be linked."""
        return self.resized_many([(height, width)], occluded_fraction)[(height, width)]

    def resized_many(
        self, sizes: Iterable[tuple[int, int]], occluded_fraction: float = 0.5
    ) -> dict[tuple[int, int], ClipFlow]:
        """`{(h, w): self.resized(h, w)}` for several grids at once, e.g. all the UNet's token grids.

        Cheaper than one `resized` per grid: a grid exactly half (per axis) of another requested grid is
        area-averaged from that one (with the occluded *fraction* carried along, not the thresholded
        mask), so the full-resolution flow is read once per chain of halvings. Same values as `resized`
        up to float rounding (~1e-6 cells)."""
        stats: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        for height, width in sorted(set(sizes), key=lambda size: -size[0] * size[1]):
            if height < 1 or width < 1:
                raise ValueError(f"cannot resize a flow to {height}x{width}")
            finer = stats.get((2 * height, 2 * width))
            stats[(height, width)] = _halve(*finer) if finer else self._area_stats(height, width)
        src_height, src_width = self.size
        resized = {}
        for (height, width), (forward, backward, occluded) in stats.items():
            if (height, width) == self.size:
                resized[(height, width)] = self
                continue
            scale = np.array([width / src_width, height / src_height], dtype=np.float32)  # (dx, dy) factors
            resized[(height, width)] = ClipFlow(
                forward * scale, backward * scale, occluded >= occluded_fraction
            )
        return resized

    def _area_stats(self, height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Forward, backward (unscaled, source pixels) and occluded fraction on a (height, width) grid."""
        if (height, width) == self.size:
            return self.forward, self.backward, self.occlusion.astype(np.float32)
        shrink = height <= self.size[0] and width <= self.size[1]
        interpolation = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
        pairs = self.frames - 1
        forward = np.empty((pairs, height, width, 2), np.float32)
        backward = np.empty((pairs, height, width, 2), np.float32)
        occluded = np.empty((pairs, height, width), np.uint8)
        occluded_u8 = self.occlusion.view(np.uint8)  # (m-1, H, W), 0/1: a free view of the bools
        for pair in range(pairs):  # cv2 resizes one image at a time; each call is multi-threaded
            forward[pair] = cv2.resize(self.forward[pair], (width, height), interpolation=interpolation)
            backward[pair] = cv2.resize(self.backward[pair], (width, height), interpolation=interpolation)
            occluded[pair] = cv2.resize(
                occluded_u8[pair] * np.uint8(255), (width, height), interpolation=interpolation
            )
        return forward, backward, occluded.astype(np.float32) / np.float32(255)


def _halve(*fields: np.ndarray) -> tuple[np.ndarray, ...]:
    """Mean of each 2x2 block of (pairs, H, W, ...) arrays -> (pairs, H/2, W/2, ...)."""
    return tuple(
        (field[:, 0::2, 0::2] + field[:, 1::2, 0::2] + field[:, 0::2, 1::2] + field[:, 1::2, 1::2])
        * np.float32(0.25)
        for field in fields
    )


def compute_flow(
    frames: np.ndarray,
    estimator: FlowEstimator | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ClipFlow:
    """Forward and backward flow between consecutive frames, and the forward occlusion mask.

    `frames` is (m, H, W, 3) uint8 RGB at working size. `progress(done, total)` is called after each pair.
    The default estimator is `DISFlow("medium")`. One frame gives empty (0, H, W, ...) arrays."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be (m, H, W, 3) RGB, got {frames.shape}")
    estimator = estimator if estimator is not None else DISFlow()
    count, height, width, _ = frames.shape
    pairs = max(count - 1, 0)
    forward = np.empty((pairs, height, width, 2), np.float32)
    backward = np.empty((pairs, height, width, 2), np.float32)
    for pair in range(pairs):
        forward[pair] = estimator(frames[pair], frames[pair + 1])
        backward[pair] = estimator(frames[pair + 1], frames[pair])
        if progress is not None:
            progress(pair + 1, pairs)
    return ClipFlow(forward, backward, occlusion_mask(forward, backward))


def flow_pairs(frames, estimator: FlowEstimator | None = None) -> Iterator[ClipFlow]:
    """The flow of each consecutive pair of `frames` ((m, H, W, 3) uint8, in memory or streamed), one
    two-frame `ClipFlow` at a time, computed when asked for from one pass over the frames: a long clip
    never has more than two frames and one pair's flow in memory. Pair i holds exactly the arrays
    `compute_flow(frames)` holds at index i."""
    estimator = estimator if estimator is not None else DISFlow()
    previous = None
    for frame in frames:
        if previous is not None:
            forward = estimator(previous, frame)[None]  # (1, H, W, 2)
            backward = estimator(frame, previous)[None]
            yield ClipFlow(forward, backward, occlusion_mask(forward, backward))
        previous = frame


def occlusion_mask(
    forward: np.ndarray,
    backward: np.ndarray,
    alpha: float = OCCLUSION_ALPHA,
    beta: float = OCCLUSION_BETA,
) -> np.ndarray:
    """Pixels of frame a with no reliable match in frame b, by forward-backward consistency.

    With f = forward(p) and b = backward(p + f) (bilinear, cv2.remap), p is occluded when

        |f + b|^2 > alpha * (|f|^2 + |b|^2) + beta          (squared pixel lengths)

    or when p + f leaves the frame. Shapes: (..., H, W, 2) flows -> (..., H, W) bool."""
    if forward.shape != backward.shape or forward.shape[-1] != 2:
        raise ValueError(f"flows must both be (..., H, W, 2), got {forward.shape} and {backward.shape}")
    height, width = forward.shape[-3:-1]
    forward_flat = forward.reshape(-1, height, width, 2).astype(np.float32, copy=False)
    backward_flat = backward.reshape(-1, height, width, 2).astype(np.float32, copy=False)
    grid_x, grid_y = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
    occluded = np.empty(forward_flat.shape[:3], bool)  # (pairs, H, W)
    for pair, (fwd, bwd) in enumerate(zip(forward_flat, backward_flat, strict=True)):
        target_x = grid_x + fwd[..., 0]
        target_y = grid_y + fwd[..., 1]
        bwd_at_target = cv2.remap(bwd, target_x, target_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        (fwd_x, fwd_y), (bwd_x, bwd_y) = np.moveaxis(fwd, -1, 0), np.moveaxis(bwd_at_target, -1, 0)
        # per component: numpy's .sum(-1) over a length-2 axis is several times slower
        mismatch = np.square(fwd_x + bwd_x) + np.square(fwd_y + bwd_y)
        magnitude = np.square(fwd_x) + np.square(fwd_y) + np.square(bwd_x) + np.square(bwd_y)
        outside = (target_x < 0) | (target_x > width - 1) | (target_y < 0) | (target_y > height - 1)
        occluded[pair] = (mismatch > alpha * magnitude + beta) | outside
    return occluded.reshape(forward.shape[:-1])
