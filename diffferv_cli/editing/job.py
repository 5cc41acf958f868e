"""The main job end to end: clip -> (cached) inversion -> edits -> videos. The CLI calls these."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffferv_cli.config import EditConfig, InversionConfig
from diffferv_cli.editing.inversion import InversionOutcome, invert
from diffferv_cli.editing.sampling import EditResult, edit
from diffferv_cli.editing.vae import decode_latents, decoded_frames
from diffferv_cli.errors import UserError

Progress = Callable[[str, int, int], None] | None


@dataclass
class Reconstruction:
    metrics: dict[str, dict[str, float]]  # label -> {"mse", "psnr", "ssim", "latent_mse"}
    result: EditResult


def output_path(clip_path: Path, label: str, out: Path | None, count: int) -> Path:
    """`out` itself for one output (a folder gets `<stem>.<label>.mp4`), else beside the input."""
    if out is not None and (out.is_dir() or (count > 1 and out.suffix == "")):
        return out / f"{clip_path.stem}.{label}.mp4"
    if out is not None:
        if count > 1:
            raise UserError("Several edits need -o to be a folder, not a file.")
        return out
    return clip_path.with_name(f"{clip_path.stem}.{label}.mp4")


def check_writable(path: Path, inputs: list[Path], overwrite: bool) -> None:
    """Fail before any work: never over an input, never over an existing file unless asked."""
    for source in inputs:
        if path.resolve() == source.resolve():
            raise UserError(f"The output {path} is the input video; choose another -o.")
    if path.exists() and not overwrite:
        raise UserError(f"{path} already exists; pass --overwrite or another -o.")
    if not path.parent.is_dir():
        raise UserError(f"The output folder {path.parent} does not exist.")


def write_result(clip, frames: np.ndarray | Iterable[np.ndarray], path: Path, *, side_by_side: bool = False,
                 progress: Progress = None) -> list[Path]:
    """The edited frames at source resolution with the source's audio; optionally an original|edited
    comparison at working size beside it (`<name>.side-by-side.mp4`). `frames` is an array, or an
    iterable of one (H, W, 3) frame at a time that is encoded as it is produced (held in memory only
    for the side-by-side video, which needs them a second time)."""
    from diffferv_cli.video.io import write_video

    report = progress or (lambda stage, done, total: None)
    if side_by_side and not isinstance(frames, np.ndarray):
        frames = np.stack(list(frames))
    audio_start = clip.frame_indices[0] / clip.info.fps
    audio_duration = len(clip.frame_indices) * clip.spec.stride / clip.info.fps
    common = dict(audio_from=clip.info.path, audio_start=audio_start, audio_duration=audio_duration,
                  input_paths=[clip.info.path], progress=lambda d, t: report("write", d, t))
    written = [write_video(frames, path, clip.fps, geometry=clip.geometry, count=len(clip.frames), **common)]
    if side_by_side:
        pair = np.concatenate([clip.frames, frames], axis=2)  # (m, H, 2W, 3)
        written.append(write_video(pair, path.with_suffix(".side-by-side.mp4"), clip.fps, **common))
    return written


def run_inversion(components, clip, config: InversionConfig, *, cache_dir=None, force=False,
                  progress: Progress = None) -> InversionOutcome:
    return invert(components, clip, config, cache_dir=cache_dir, force=force, progress=progress)


def run_edits(components, clip, inversion: InversionConfig, edits: list[tuple[str, EditConfig]], *,
              cache_dir=None, force=False, out: Path | None = None, overwrite=False, side_by_side=False,
              progress: Progress = None) -> tuple[InversionOutcome, list[Path]]:
    """Invert once (or reuse the cache), then sample and write every edit."""
    targets = [output_path(clip.info.path, label, out, len(edits)) for label, _ in edits]
    for target in targets:
        check_writable(target, [clip.info.path], overwrite)
    outcome = run_inversion(components, clip, inversion, cache_dir=cache_dir, force=force, progress=progress)
    written: list[Path] = []
    report = progress or (lambda stage, done, total: None)
    for (_, config), target in zip(edits, targets, strict=True):
        result = edit(components, outcome.entry, config, feature_mode=inversion.feature_mode, progress=progress,
                      decode=False)
        frames = decoded_frames(components.vae, result.latents, progress=lambda d, t: report("decode", d, t))
        written += write_result(clip, frames, target, side_by_side=side_by_side, progress=progress)
    return outcome, written


def frame_metrics(reference: np.ndarray, frames: np.ndarray) -> dict[str, float]:
    from diffferv_cli.evaluation.metrics import mse, psnr, ssim

    return {"mse": float(mse(reference, frames)), "psnr": float(psnr(reference, frames)),
            "ssim": float(ssim(reference, frames))}


def _path_label(config: EditConfig) -> str:
    return "exact" if config.exact else ("injected (paper)" if config.inject else "plain DDIM")


def run_reconstruction(components, clip, inversion: InversionConfig, config: EditConfig, *, cache_dir=None,
                       force=False, compare=False, progress: Progress = None) -> tuple[InversionOutcome, Reconstruction]:
    """Reconstruction (edit prompt = source prompt) from the cache, with metrics against the input frames
    at working size: the VAE round trip alone (the floor), then the chosen path, then, with `compare`,
    the other two of: injected (the paper's method), exact (injected + the exact correction), plain DDIM."""
    outcome = run_inversion(components, clip, inversion, cache_dir=cache_dir, force=force, progress=progress)
    entry = outcome.entry
    z0 = entry.read_latent(0)
    floor = decode_latents(components.vae, z0)
    metrics = {"vae round trip": frame_metrics(clip.frames, floor)}
    paths = [config]
    if compare:
        paths += [config.model_copy(update=change) for change in
                  (dict(inject=True, exact=False), dict(inject=True, exact=True), dict(inject=False, exact=False))
                  if config.model_copy(update=change) != config]
    result = None
    for path_config in paths:
        path_result = edit(components, entry, path_config, feature_mode=inversion.feature_mode, progress=progress)
        result = result or path_result
        metrics[_path_label(path_config)] = {**frame_metrics(clip.frames, path_result.frames),
                                             "latent_mse": float(((path_result.latents - z0) ** 2).mean())}
    return outcome, Reconstruction(metrics, result)
