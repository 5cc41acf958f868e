"""Temporal context windows: every UNet pass over a clip runs on overlapping windows of frames, and the
noise predictions of frames that several windows see are blended (temporal co-denoising, as in
Gen-L-Video; AnimateDiff's context windows). Memory is then set by the window, not by the clip.

Pure: integers in, index ranges and weight tensors out; no model inside.

Schedule (`window_schedule`): windows of `window_frames` frames start every `window_frames - overlap`
frames from frame 0; the last window is moved back to end on the clip's last frame, so every window is
full-length and the last overlap may be larger than `overlap`. A clip of at most `window_frames` frames
is one window: the whole clip, exactly the UNet pass without windows.

Blending (`blend_weights`): inside a window of length L, frame j gets the raw weight min(j + 1, L - j)
(a pyramid, highest at the centre, where the frame's temporal context inside the window is widest);
each frame's weights over the windows that contain it are divided by their sum, so they sum to one.
Across an overlap the weight moves linearly-ish from one window to the next instead of jumping, which
is what hides the window edges. A frame seen by one window only gets weight exactly 1.0.

    eps[f] = sum over windows k containing f of  weight_k[f - start_k] * eps_k[f - start_k]

`blend` is that sum for whole windows at once; `reference_blend` in the tests writes it per frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffferv_cli.config import DEFAULT_WINDOW_FRAMES  # noqa: F401  (re-exported)


def default_overlap(window_frames: int, swcfa_window: int) -> int:
    """A quarter of the window, and never less than the SWCFA window, so that a frame next to a window's
    edge is also seen, with its full SWCFA neighbourhood, by the next window."""
    return min(max(swcfa_window, window_frames // 4), window_frames - 1)


def check_window(window_frames: int, swcfa_window: int, overlap: int | None = None) -> int:
    """The overlap to use (default: `default_overlap`); ValueError with a sentence for a bad setting."""
    if window_frames < swcfa_window + 1:
        raise ValueError(f"the temporal window must hold at least the SWCFA window + 1 = {swcfa_window + 1} "
                         f"frames, got {window_frames}")
    overlap = default_overlap(window_frames, swcfa_window) if overlap is None else overlap
    if not swcfa_window <= overlap < window_frames:
        raise ValueError(f"the window overlap must be at least the SWCFA window ({swcfa_window}) and less "
                         f"than the window ({window_frames} frames), got {overlap}")
    return overlap


@dataclass(frozen=True)
class Window:
    start: int
    stop: int  # exclusive

    @property
    def frames(self) -> int:
        return self.stop - self.start

    @property
    def slice(self) -> slice:
        return slice(self.start, self.stop)


def window_schedule(frames: int, window_frames: int, overlap: int) -> list[Window]:
    """The windows covering frames 0..frames-1 (module docstring), in order."""
    if frames < 1 or window_frames < 1 or not 0 <= overlap < window_frames:
        raise ValueError(f"bad window schedule: {frames} frames, window {window_frames}, overlap {overlap}")
    if frames <= window_frames:
        return [Window(0, frames)]
    stride = window_frames - overlap
    starts = list(range(0, frames - window_frames, stride)) + [frames - window_frames]
    return [Window(start, start + window_frames) for start in starts]


def schedule_from_json(pairs) -> list[Window]:
    return [Window(int(start), int(stop)) for start, stop in pairs]


def schedule_to_json(windows: list[Window]) -> list[list[int]]:
    return [[window.start, window.stop] for window in windows]


def blend_weights(windows: list[Window], frames: int) -> list[torch.Tensor]:
    """Per window, (window.frames,) float32 weights of its frames; over the windows containing a frame
    they sum to one (module docstring)."""
    raw = []
    total = torch.zeros(frames, dtype=torch.float64)
    for window in windows:
        position = torch.arange(window.frames, dtype=torch.float64)
        pyramid = torch.minimum(position + 1, window.frames - position)  # (L,)
        raw.append(pyramid)
        total[window.slice] += pyramid
    if bool((total == 0).any()):
        raise ValueError("the windows do not cover every frame")
    return [(pyramid / total[window.slice]).to(torch.float32) for window, pyramid in zip(windows, raw, strict=True)]


class NoiseBlend:
    """Accumulates the windows' noise predictions of one UNet pass over the clip into one (frames, ...)
    tensor: `add(k, eps_k)` for every window, then `result`. Float32, on the weights' device (the step
    loops keep it on the UNet's device)."""

    def __init__(self, windows: list[Window], weights: list[torch.Tensor], shape: tuple[int, ...]):
        self.windows, self.weights = windows, weights
        device = weights[0].device if weights else None
        self.result = torch.zeros(shape, dtype=torch.float32, device=device)  # (frames, channels, height, width)

    def add(self, index: int, noise: torch.Tensor) -> None:
        window, weight = self.windows[index], self.weights[index]
        if noise.shape[0] != window.frames:
            raise ValueError(f"window {index} has {window.frames} frames, its noise {noise.shape[0]}")
        self.result[window.slice] += weight.view(-1, *([1] * (noise.ndim - 1))) * noise.float().to(self.result.device)


def blend(windows: list[Window], predictions: list[torch.Tensor], frames: int) -> torch.Tensor:
    """The blended noise of the whole clip from every window's prediction ((L_k, ...) each)."""
    blended = NoiseBlend(windows, blend_weights(windows, frames), (frames, *predictions[0].shape[1:]))
    for index, noise in enumerate(predictions):
        blended.add(index, noise)
    return blended.result


class RollingBlend:
    """`NoiseBlend` a window at a time, for step loops that never hold the clip: `add(k, eps_k)` the
    windows in order, and after each, `ready(k)` hands out the frames no later window sees, blended
    (frames `lo` .. `hi`, float32). Each frame gets exactly NoiseBlend's sum (the same products added in
    the same window order, from zero), so memory holds the windows still open, not the clip.

    `whole`: hand out nothing before the last window, then the whole clip at once (a torch.distributed
    job sums every rank's windows before stepping, temporal/ranks.py)."""

    def __init__(self, windows: list[Window], weights: list[torch.Tensor], frames: int, *, whole: bool = False):
        self.windows, self.weights, self.frames, self.whole = windows, weights, frames, whole
        self._open: list[tuple[int, torch.Tensor]] = []
        self._next = 0  # the first frame not handed out yet
        self._shape: tuple[int, ...] | None = None
        self._device = weights[0].device if weights else None

    def add(self, index: int, noise: torch.Tensor) -> None:
        window = self.windows[index]
        if noise.shape[0] != window.frames:
            raise ValueError(f"window {index} has {window.frames} frames, its noise {noise.shape[0]}")
        self._shape = tuple(noise.shape[1:])
        self._open.append((index, noise))

    def ready(self, index: int, shape: tuple[int, ...] | None = None) -> list[tuple[int, int, torch.Tensor]]:
        """After window `index`: [(lo, hi, blended noise (hi - lo, ...))] for the frames now complete, or []."""
        last = index == len(self.windows) - 1
        if self.whole and not last:
            return []
        upto = self.frames if last else self.windows[index + 1].start
        if upto <= self._next:
            return []
        lo, hi = self._next, upto
        shape = self._shape or shape
        if shape is None:
            raise ValueError("no window was added and no frame shape was given")
        out = torch.zeros((hi - lo, *shape), dtype=torch.float32, device=self._device)
        for number, noise in self._open:
            window, weight = self.windows[number], self.weights[number]
            first, stop = max(lo, window.start), min(hi, window.stop)
            if first < stop:
                part = noise[first - window.start:stop - window.start]
                out[first - lo:stop - lo] += (weight[first - window.start:stop - window.start].view(-1, *([1] * len(shape)))
                                              * part.float().to(out.device))
        self._open = [(number, noise) for number, noise in self._open if self.windows[number].stop > hi]
        self._next = hi
        return [(lo, hi, out)]
