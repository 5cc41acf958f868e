"""Evaluation metrics of the paper (section 4.2) as pure functions on numpy arrays.

Scale and conventions (all math in float64):

* Frames are uint8 RGB `(H, W, 3)` or clips `(m, H, W, 3)`. Every pixel metric first maps them to
  **[0, 1]** (`x / 255`), the scale of the paper's Table 1 (MSE 0.010 is an error of ~0.1 per channel).
* **MSE**: mean squared error over pixels and channels, per frame; the clip value is the mean over frames.
* **PSNR**: `10 log10(1 / MSE)` dB per frame (peak 1.0), **capped at `PSNR_CAP_DB` = 100 dB** so identical
  frames (MSE 0) give a finite number that JSON can hold and averages stay defined; the clip value is the
  mean of the per-frame values. (At 512x512 a single pixel off by one level is already ~107 dB.)
* **SSIM**: scikit-image `structural_similarity` on the [0, 1] frames, `data_range=1`, colour channels
  averaged (`channel_axis=-1`), with the settings of Wang et al. 2004 (Gaussian window sigma 1.5,
  population covariance); the clip value is the mean over frames.
* **LPIPS** (AlexNet, Zhang et al. 2018): only when the `lpips` package imports and torchvision's AlexNet
  weights are already in the torch hub cache; otherwise `Unavailable(reason)`. Never downloads.
* **Identity** on dlib's 128-D face descriptors (see `faces.py`). Similarity of two descriptors:
  `"dlib"` (default) `sim = 1 - ||a - b||_2`, the complement of dlib's own metric (same person across
  frames of one clip ~0.7, different people ~0.1-0.4, dlib's same-person threshold 0.6 -> 0.4);
  `"cosine"` is the cosine of the angle (STIT used cosine on ArcFace features; on dlib descriptors cosine
  is compressed into ~0.8-0.95, so it separates people poorly).
  - IDP = mean_i sim(edited_i, source_i).
  - TL-ID (STIT, Tzaban et al. 2022) = mean_i sim(E_i, E_i+1) / mean_i sim(S_i, S_i+1): adjacent frames,
    relative to the source video's own consistency (1.0 = as consistent as the source).
  - TG-ID = mean_{i<j} sim(E_i, E_j) / mean_{i<j} sim(S_i, S_j): all frame pairs, same normalisation.
  Only frames where a face was found on both sides count; "adjacent" pairs are (i, i+1) with both kept.
* **Flow-warping error** (Lai et al. 2018 style): edited frame i+1 is warped back onto frame i with the
  SOURCE video's forward flow i -> i+1 (`cv2.remap`, bilinear); the error is the mean over channels and
  non-occluded, in-frame pixels of frame i, in [0, 1] units, squared (`warp_mse`) and absolute
  (`warp_mae`), averaged over pairs.
* **TACR / NAPR** (Yao et al. 2021) from a user-supplied attribute classifier: TACR = fraction of frames
  whose binary target-attribute prediction differs from the source frame's; NAPR = fraction of (frame,
  non-target attribute) predictions that stay the same.
* **CLIP-IQA** (Wang et al. 2023): softmax over the CLIP similarities of a frame with an antonym prompt
  pair ("Good photo." / "Bad photo."), probability of the first; from a user-supplied CLIP model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

PSNR_CAP_DB = 100.0
Similarity = Literal["dlib", "cosine"]


@dataclass(frozen=True)
class Unavailable:
    """A metric that could not be computed, and why (shown to the user instead of a number)."""

    reason: str

    def __str__(self) -> str:
        return f"unavailable: {self.reason}"


# Pixel metrics --------------------------------------------------------------------------------------


def to_unit(frames: np.ndarray) -> np.ndarray:
    """uint8 frames -> float64 in [0, 1]. Float input is taken as already in [0, 1]."""
    frames = np.asarray(frames)
    if frames.dtype == np.uint8:
        return frames.astype(np.float64) / 255.0
    return frames.astype(np.float64, copy=False)


def _check_pair(source: np.ndarray, edited: np.ndarray) -> None:
    if source.shape != edited.shape:
        raise ValueError(f"shapes differ: {source.shape} vs {edited.shape}")


def _as_clip(frames: np.ndarray) -> np.ndarray:
    return frames[None] if frames.ndim == 3 else frames  # (m, H, W, C)


def mse_per_frame(source: np.ndarray, edited: np.ndarray) -> np.ndarray:
    """(m,) MSE in [0, 1] units for clips (m, H, W, 3) (a single frame gives shape (1,))."""
    _check_pair(source, edited)
    difference = to_unit(_as_clip(source)) - to_unit(_as_clip(edited))  # (m, H, W, C)
    return np.square(difference).reshape(difference.shape[0], -1).mean(axis=1)


def mse(source: np.ndarray, edited: np.ndarray) -> float:
    """Mean over frames of the per-frame MSE, [0, 1] units."""
    return float(mse_per_frame(source, edited).mean())


def psnr_from_mse(mse_value: np.ndarray | float) -> np.ndarray:
    """PSNR in dB for peak 1.0, capped at PSNR_CAP_DB (MSE 0 -> the cap)."""
    mse_value = np.asarray(mse_value, dtype=np.float64)
    with np.errstate(divide="ignore"):
        decibels = 10.0 * np.log10(1.0 / mse_value)
    return np.minimum(decibels, PSNR_CAP_DB)


def psnr_per_frame(source: np.ndarray, edited: np.ndarray) -> np.ndarray:
    return psnr_from_mse(mse_per_frame(source, edited))


def psnr(source: np.ndarray, edited: np.ndarray) -> float:
    """Mean over frames of the per-frame (capped) PSNR, dB."""
    return float(psnr_per_frame(source, edited).mean())


def ssim_per_frame(source: np.ndarray, edited: np.ndarray) -> np.ndarray:
    """(m,) SSIM (Wang et al. 2004 settings) of [0, 1] frames, channels averaged."""
    from skimage.metrics import structural_similarity

    _check_pair(source, edited)
    source_clip, edited_clip = _as_clip(source), _as_clip(edited)
    values = [
        structural_similarity(
            to_unit(a), to_unit(b), data_range=1.0, channel_axis=-1 if a.ndim == 3 else None,
            gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
        )
        for a, b in zip(source_clip, edited_clip, strict=True)
    ]
    return np.asarray(values, dtype=np.float64)


def ssim(source: np.ndarray, edited: np.ndarray) -> float:
    return float(ssim_per_frame(source, edited).mean())


# LPIPS ----------------------------------------------------------------------------------------------

def lpips_per_frame(source: np.ndarray, edited: np.ndarray) -> np.ndarray | Unavailable:
    """(m,) LPIPS (AlexNet, v0.1) or `Unavailable`. Frames go in as [-1, 1] tensors, as lpips expects."""
    import torch

    from diffferv_cli.models.auxiliary import load_lpips

    model, reason = load_lpips()
    if model is None:
        return Unavailable(reason)
    _check_pair(source, edited)
    values = []
    with torch.no_grad():
        for a, b in zip(_as_clip(source), _as_clip(edited), strict=True):
            pair = [torch.from_numpy(to_unit(x)).permute(2, 0, 1)[None].float() * 2 - 1 for x in (a, b)]
            values.append(float(model(*pair).reshape(())))
    return np.asarray(values, dtype=np.float64)


# Identity -------------------------------------------------------------------------------------------


def similarity(a: np.ndarray, b: np.ndarray, kind: Similarity = "dlib") -> np.ndarray:
    """Row-wise identity similarity of descriptors (..., 128): 1 - L2 distance ("dlib") or cosine."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if kind == "dlib":
        return 1.0 - np.linalg.norm(a - b, axis=-1)
    if kind == "cosine":
        return np.sum(a * b, axis=-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    raise ValueError(f"unknown similarity {kind!r}; use 'dlib' or 'cosine'")


def identity_preservation(source: np.ndarray, edited: np.ndarray, kind: Similarity = "dlib") -> float:
    """IDP: mean over frames of sim(edited_i, source_i); descriptors (n, 128)."""
    _check_pair(source, edited)
    return float(similarity(edited, source, kind).mean())


def adjacent_similarity(descriptors: np.ndarray, kind: Similarity = "dlib",
                        adjacent: np.ndarray | None = None) -> float:
    """Mean sim(d_i, d_i+1) over consecutive rows (only the pairs where `adjacent[i]` is True)."""
    values = similarity(descriptors[:-1], descriptors[1:], kind)  # (n-1,)
    if adjacent is not None:
        values = values[adjacent]
    return float(values.mean()) if values.size else float("nan")


def all_pairs_similarity(descriptors: np.ndarray, kind: Similarity = "dlib") -> float:
    """Mean sim(d_i, d_j) over all pairs i < j, one row i at a time: memory linear in the number of
    descriptors, not in the number of pairs (10,000 frames make 50 million pairs)."""
    descriptors = np.asarray(descriptors, dtype=np.float64)  # (n, 128)
    count = len(descriptors)
    if count < 2:
        return float("nan")
    total = sum(float(similarity(descriptors[row], descriptors[row + 1:], kind).sum()) for row in range(count - 1))
    return total / (count * (count - 1) // 2)


def temporal_local_identity(source: np.ndarray, edited: np.ndarray, kind: Similarity = "dlib",
                            adjacent: np.ndarray | None = None) -> float:
    """TL-ID (STIT): adjacent-frame identity similarity of the edit relative to the source's."""
    _check_pair(source, edited)
    return adjacent_similarity(edited, kind, adjacent) / adjacent_similarity(source, kind, adjacent)


def temporal_global_identity(source: np.ndarray, edited: np.ndarray, kind: Similarity = "dlib") -> float:
    """TG-ID (STIT): all-pairs identity similarity of the edit relative to the source's."""
    _check_pair(source, edited)
    return all_pairs_similarity(edited, kind) / all_pairs_similarity(source, kind)


@dataclass(frozen=True)
class IdentityScores:
    idp: float | Unavailable
    tl_id: float | Unavailable
    tg_id: float | Unavailable
    frames_used: int
    frames_without_face_source: int
    frames_without_face_edited: int


def identity_metrics(source: Sequence[np.ndarray | None], edited: Sequence[np.ndarray | None],
                     kind: Similarity = "dlib") -> IdentityScores:
    """IDP, TL-ID and TG-ID from per-frame descriptors (None where no face was found).

    Frames without a face on either side are counted and skipped; TL-ID uses the pairs (i, i+1) of the
    original numbering where both frames are kept."""
    if len(source) != len(edited):
        raise ValueError(f"descriptor sequences differ in length: {len(source)} vs {len(edited)}")
    kept = np.array([s is not None and e is not None for s, e in zip(source, edited, strict=True)], bool)
    missing_source = sum(s is None for s in source)
    missing_edited = sum(e is None for e in edited)
    used = int(kept.sum())

    def scores(idp, tl_id, tg_id) -> IdentityScores:
        return IdentityScores(idp, tl_id, tg_id, used, missing_source, missing_edited)

    if used == 0:
        none = Unavailable(f"no face found in {len(source)} frames" if missing_source == len(source)
                           else f"no frame with a face on both sides (of {len(source)})")
        return scores(none, none, none)
    source_kept = np.stack([s for s, k in zip(source, kept, strict=True) if k])  # (n, 128)
    edited_kept = np.stack([e for e, k in zip(edited, kept, strict=True) if k])
    idp = identity_preservation(source_kept, edited_kept, kind)
    indices = np.flatnonzero(kept)
    adjacent = np.diff(indices) == 1  # (n-1,): kept rows j, j+1 are frames i, i+1
    tl_id: float | Unavailable = (
        temporal_local_identity(source_kept, edited_kept, kind, adjacent) if adjacent.any()
        else Unavailable("no two adjacent frames with a face"))
    tg_id: float | Unavailable = (
        temporal_global_identity(source_kept, edited_kept, kind) if used >= 2
        else Unavailable("fewer than two frames with a face"))
    return scores(idp, tl_id, tg_id)


# Temporal -------------------------------------------------------------------------------------------


def warp_to_previous(next_frame: np.ndarray, forward_flow: np.ndarray) -> np.ndarray:
    """Frame i+1 sampled on frame i's grid: out(p) = next(p + flow_i->i+1(p)) (bilinear, zeros outside).

    `next_frame` (H, W, C) float or uint8, `forward_flow` (H, W, 2) (dx, dy) pixels -> (H, W, C) float64."""
    height, width = forward_flow.shape[:2]
    grid_x, grid_y = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
    map_x = grid_x + forward_flow[..., 0].astype(np.float32)
    map_y = grid_y + forward_flow[..., 1].astype(np.float32)
    next_frame = np.asarray(next_frame)
    # uint8 levels are exact in float32, so a whole-pixel flow reproduces them bit for bit
    frame = next_frame.astype(np.float32)
    warped = cv2.remap(frame, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    warped = warped.reshape(frame.shape).astype(np.float64)
    return warped / 255.0 if next_frame.dtype == np.uint8 else warped


@dataclass(frozen=True)
class WarpError:
    mse: float  # mean over pairs of the mean squared error over valid pixels, [0, 1] units
    mae: float  # the same with absolute error
    per_pair_mse: np.ndarray  # (m-1,)
    valid_fraction: float  # share of pixels that were neither occluded nor out of frame


@dataclass(frozen=True)
class PairWarpError:
    """The warping error of one pair of frames (i, i+1)."""

    mse: float  # mean squared error over the valid pixels, [0, 1] units; NaN when none is valid
    mae: float  # the same with absolute error
    valid: int  # pixels that were neither occluded nor out of frame


def pair_warping_error(frame: np.ndarray, next_frame: np.ndarray, forward_flow: np.ndarray,
                       occlusion: np.ndarray) -> PairWarpError:
    """Warping error of `next_frame` warped back onto `frame` (both (H, W, 3)) under the SOURCE's flow
    `forward_flow` (H, W, 2) frame -> next frame and its `occlusion` (H, W) bool, which is excluded."""
    if forward_flow.shape[:2] != frame.shape[:2] or occlusion.shape != frame.shape[:2] \
            or next_frame.shape != frame.shape:
        raise ValueError(f"flow {forward_flow.shape} / occlusion {occlusion.shape} do not fit frames "
                         f"{frame.shape} and {next_frame.shape}")
    warped = warp_to_previous(next_frame, forward_flow)  # (H, W, C)
    valid = ~occlusion  # (H, W)
    difference = (to_unit(frame) - warped)[valid]  # (valid pixels, C)
    if not difference.size:
        return PairWarpError(float("nan"), float("nan"), int(valid.sum()))
    return PairWarpError(float(np.square(difference).mean()), float(np.abs(difference).mean()), int(valid.sum()))


def warping_error_of_pairs(pairs: Sequence[PairWarpError], pixels: int) -> WarpError:
    """A clip's `WarpError` from the errors of its consecutive pairs (at least one), `pixels` = H * W."""
    if not pairs:
        raise ValueError("the warping error needs at least two frames")
    per_pair = np.asarray([pair.mse for pair in pairs], dtype=np.float64)  # (m-1,)
    valid = sum(pair.valid for pair in pairs)
    return WarpError(_mean_of_counted(per_pair), _mean_of_counted([pair.mae for pair in pairs]), per_pair,
                     valid / (len(pairs) * pixels))


def flow_warping_error(frames: np.ndarray, forward: np.ndarray, occlusion: np.ndarray) -> WarpError:
    """Warping error of `frames` (m, H, W, 3) under the given (source) flow.

    `forward` (m-1, H, W, 2) flow i -> i+1 and `occlusion` (m-1, H, W) bool of the SOURCE video, at the
    frames' size. Pixels occluded in the source (or leaving the frame) are excluded. A clip too long to
    hold goes pair by pair through `pair_warping_error` and `warping_error_of_pairs` (what this does)."""
    count = len(frames)
    if forward.shape[:3] != (count - 1, *frames.shape[1:3]) or occlusion.shape != forward.shape[:3]:
        raise ValueError(f"flow {forward.shape} / occlusion {occlusion.shape} do not fit frames {frames.shape}")
    if count < 2:
        raise ValueError("the warping error needs at least two frames")
    pairs = [pair_warping_error(frames[pair], frames[pair + 1], forward[pair], occlusion[pair])
             for pair in range(count - 1)]
    return warping_error_of_pairs(pairs, frames.shape[1] * frames.shape[2])


def _mean_of_counted(values: Sequence[float] | np.ndarray) -> float:
    """Mean over the pairs that had visible pixels (not NaN); NaN, without a warning, when none had."""
    values = np.asarray(values, dtype=np.float64)
    counted = values[~np.isnan(values)]
    return float(counted.mean()) if counted.size else float("nan")


# Attribute classifier and CLIP-IQA (from user-supplied models) -----------------------------------------


@dataclass(frozen=True)
class AttributeRates:
    tacr: float
    napr: float
    frames: int


def attribute_rates(source: np.ndarray, edited: np.ndarray, labels: Sequence[str], target: str) -> AttributeRates:
    """TACR and NAPR from binary attribute predictions (frames, attributes) of source and edited frames."""
    source = np.asarray(source, bool)
    edited = np.asarray(edited, bool)
    _check_pair(source, edited)
    labels = list(labels)
    if target not in labels:
        raise ValueError(f"target attribute {target!r} is not one of {labels}")
    column = labels.index(target)
    changed = source != edited  # (frames, attributes)
    others = np.delete(~changed, column, axis=1)
    napr = float(others.mean()) if others.size else float("nan")
    return AttributeRates(tacr=float(changed[:, column].mean()), napr=napr, frames=len(source))


def clip_iqa_from_similarities(positive: np.ndarray, negative: np.ndarray, logit_scale: float = 100.0) -> np.ndarray:
    """CLIP-IQA per frame: softmax over (positive, negative) cosine similarities, probability of positive."""
    logits = logit_scale * np.stack([np.asarray(positive, np.float64), np.asarray(negative, np.float64)], -1)
    logits -= logits.max(axis=-1, keepdims=True)
    probabilities = np.exp(logits)
    return probabilities[..., 0] / probabilities.sum(axis=-1)


# Identity frame by frame (what the reports plot) -----------------------------------------------------


@dataclass(frozen=True)
class IdentitySeries:
    """`identity_metrics` frame by frame, NaN where a frame (or a pair) does not count.

    `idp` (m,): sim(E_i, S_i), NaN where either side has no face. `edited_adjacent` and
    `source_adjacent` (m-1,): sim(E_i, E_i+1) and sim(S_i, S_i+1), NaN unless frames i and i+1 both
    have a face on both sides; so IDP = nanmean(idp) and TL-ID = nanmean(edited_adjacent) /
    nanmean(source_adjacent)."""

    idp: np.ndarray
    edited_adjacent: np.ndarray
    source_adjacent: np.ndarray
    face_source: np.ndarray  # (m,) bool
    face_edited: np.ndarray  # (m,) bool


def identity_series(source: Sequence[np.ndarray | None], edited: Sequence[np.ndarray | None],
                    kind: Similarity = "dlib") -> IdentitySeries:
    """Per-frame identity similarities from per-frame descriptors (None where no face was found)."""
    if len(source) != len(edited):
        raise ValueError(f"descriptor sequences differ in length: {len(source)} vs {len(edited)}")
    face_source = np.array([s is not None for s in source], bool)
    face_edited = np.array([e is not None for e in edited], bool)
    kept = face_source & face_edited
    count = len(source)
    idp = np.full(count, np.nan)
    edited_adjacent = np.full(max(count - 1, 0), np.nan)
    source_adjacent = np.full(max(count - 1, 0), np.nan)
    for index in np.flatnonzero(kept):
        idp[index] = float(similarity(edited[index], source[index], kind))
        if index + 1 < count and kept[index + 1]:
            edited_adjacent[index] = float(similarity(edited[index], edited[index + 1], kind))
            source_adjacent[index] = float(similarity(source[index], source[index + 1], kind))
    return IdentitySeries(idp, edited_adjacent, source_adjacent, face_source, face_edited)
