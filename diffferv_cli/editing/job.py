"""The main job end to end: clip -> (cached) inversion -> edits -> videos. The CLI calls these."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from diffferv_cli.config import CompositeConfig, EditConfig, InversionConfig
from diffferv_cli.editing.inversion import InversionOutcome, invert
from diffferv_cli.editing.sampling import EditResult, edit
from diffferv_cli.editing.vae import decode_latents
from diffferv_cli.errors import UserError

Progress = Callable[[str, int, int], None] | None


@dataclass
class Reconstruction:
    metrics: dict[str, dict[str, float]]  # label -> {"mse", "psnr", "ssim", "latent_mse"}, at working size
    result: EditResult
    reference: np.ndarray | None = None  # R, the decode of z_0 (working size)
    source_metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # at source resolution


def output_path(clip_path: Path, label: str, out: Path | None, count: int) -> Path:
    """`out` itself for one output (a folder gets `<stem>.<label>.mp4`), else beside the input."""
    if out is not None and (out.is_dir() or (count > 1 and out.suffix == "")):
        return out / f"{clip_path.stem}.{label}.mp4"
    if out is not None:
        if count > 1:
            raise UserError("Several edits need -o to be a folder, not a file.")
        return out
    return clip_path.with_name(f"{clip_path.stem}.{label}.mp4")


def side_by_side_path(path: Path) -> Path:
    """Where `--side-by-side` writes the original|edited comparison of the output `path`."""
    return path.with_suffix(".side-by-side.mp4")


def check_writable(path: Path, inputs: list[Path], overwrite: bool) -> None:
    """Fail before any work: never over an input, never over an existing file unless asked."""
    for source in inputs:
        if path.resolve() == source.resolve():
            raise UserError(f"The output {path} is the input video; choose another -o.")
    if path.exists() and not overwrite:
        raise UserError(f"{path} already exists; pass --overwrite or another -o.")
    if not path.parent.is_dir():
        raise UserError(f"The output folder {path.parent} does not exist.")


def output_frames(clip, frames: np.ndarray, composite: CompositeConfig, reference: np.ndarray | None = None):
    """The edited working-size frames as source-resolution output frames, composited into the source
    frames (streamed from the input, never the whole clip in memory): a `video.io.FrameStream`."""
    from diffferv_cli.editing.composite import composite_frames, needs_source
    from diffferv_cli.video.io import FrameStream
    from diffferv_cli.video.stream import stream_frames

    if composite.mode == "residual" and reference is None:
        raise ValueError("residual compositing needs the reference frames R (decode of z_0)")
    sources = None
    if needs_source(composite, clip.spec.region):
        sources = stream_frames(clip.info.path, clip.frame_indices, clip.spec.stride, info=clip.info)
    return FrameStream(composite_frames(sources, frames, reference, clip.geometry, composite, clip.spec.region),
                       count=len(frames), size=(clip.info.width, clip.info.height))


def write_result(clip, frames: np.ndarray, path: Path, *, side_by_side: bool = False,
                 composite: CompositeConfig | None = None, reference: np.ndarray | None = None,
                 lossless: bool = False, progress: Progress = None) -> list[Path]:
    """The edited frames at source resolution (composited as `composite` says, default `replace`;
    `reference` = R, the decode of the cached z_0, for residual compositing) with the source's audio
    and the frame selection in its metadata; optionally the original|edited comparison at the output's
    size beside it (`side_by_side_path`)."""
    from diffferv_cli.video.geometry import SourceFrames
    from diffferv_cli.video.io import write_side_by_side, write_video

    composite = composite or CompositeConfig(mode="replace")

    report = progress or (lambda stage, done, total: None)
    audio_start = clip.frame_indices[0] / clip.info.fps
    audio_duration = len(clip.frame_indices) * clip.spec.stride / clip.info.fps
    common = dict(audio_from=clip.info.path, audio_start=audio_start, audio_duration=audio_duration,
                  input_paths=[clip.info.path], progress=lambda d, t: report("write", d, t))
    selection = SourceFrames.of(clip.frame_indices, source_count=clip.info.frame_count)
    written = [write_video(output_frames(clip, frames, composite, reference), path, clip.fps, lossless=lossless,
                           source_frames=selection, **common)]
    if side_by_side:
        written.append(write_side_by_side(clip, path, side_by_side_path(path), progress=common["progress"]))
    return written


def source_reference(components, entry, progress: Progress = None) -> np.ndarray:
    """R: the VAE decode of the cached source latent z_0, at working size (the input's round trip)."""
    report = progress or (lambda stage, done, total: None)
    return decode_latents(components.vae, entry.read_latent(0), progress=lambda d, t: report("decode R", d, t))


def run_inversion(components, clip, config: InversionConfig, *, cache_dir=None, force=False,
                  progress: Progress = None, compile_unet: bool = False) -> InversionOutcome:
    return invert(components, clip, config, cache_dir=cache_dir, force=force, progress=progress,
                  compile_unet=compile_unet)


def run_edits(components, clip, inversion: InversionConfig, edits: list[tuple[str, EditConfig]], *,
              cache_dir=None, force=False, out: Path | None = None, overwrite=False, side_by_side=False,
              composite: CompositeConfig = CompositeConfig(), lossless: bool = False,
              progress: Progress = None, compile_unet: bool = False) -> tuple[InversionOutcome, list[Path]]:
    """Invert once (or reuse the cache), then sample and write every edit."""
    targets = [output_path(clip.info.path, label, out, len(edits)) for label, _ in edits]
    for target in targets + ([side_by_side_path(target) for target in targets] if side_by_side else []):
        check_writable(target, [clip.info.path], overwrite)
    outcome = run_inversion(components, clip, inversion, cache_dir=cache_dir, force=force, progress=progress,
                            compile_unet=compile_unet)
    reference = source_reference(components, outcome.entry, progress) if composite.mode == "residual" else None
    written: list[Path] = []
    for (_, config), target in zip(edits, targets, strict=True):
        result = edit(components, outcome.entry, config, feature_mode=inversion.feature_mode, progress=progress,
                      compile_unet=compile_unet)
        written += write_result(clip, result.frames, target, side_by_side=side_by_side, composite=composite,
                                reference=reference, lossless=lossless, progress=progress)
    return outcome, written


def frame_metrics(reference: np.ndarray, frames: np.ndarray) -> dict[str, float]:
    from diffferv_cli.evaluation.metrics import mse, psnr, ssim

    return {"mse": float(mse(reference, frames)), "psnr": float(psnr(reference, frames)),
            "ssim": float(ssim(reference, frames))}


def source_resolution_metrics(clip, candidates: dict[str, tuple[np.ndarray, CompositeConfig]],
                              reference: np.ndarray | None, progress: Progress = None) -> dict[str, dict[str, float]]:
    """MSE / PSNR / SSIM against the source frames at their own resolution of each candidate (edited
    working-size frames and how they are composited), in one streamed pass over the source frames."""
    from diffferv_cli.editing.composite import composite_frame
    from diffferv_cli.evaluation.metrics import mse_per_frame, psnr_from_mse, ssim_per_frame
    from diffferv_cli.video.stream import stream_frames

    report = progress or (lambda stage, done, total: None)
    values: dict[str, dict[str, list[float]]] = {label: {"mse": [], "psnr": [], "ssim": []} for label in candidates}
    count = len(clip.frame_indices)
    for index, source in enumerate(stream_frames(clip.info.path, clip.frame_indices, clip.spec.stride, info=clip.info)):
        for label, (frames, config) in candidates.items():
            output = composite_frame(source, frames[index], None if reference is None else reference[index],
                                     clip.geometry, config, clip.spec.region)
            error = float(mse_per_frame(source, output)[0])
            values[label]["mse"].append(error)
            values[label]["psnr"].append(float(psnr_from_mse(error)))
            values[label]["ssim"].append(float(ssim_per_frame(source, output)[0]))
        report("metrics", index + 1, count)
    return {label: {name: float(np.mean(series)) for name, series in metrics.items()}
            for label, metrics in values.items()}


def _path_label(config: EditConfig) -> str:
    return "exact" if config.exact else ("injected (paper)" if config.inject else "plain DDIM")


def run_reconstruction(components, clip, inversion: InversionConfig, config: EditConfig, *, cache_dir=None,
                       force=False, compare=False, composite: CompositeConfig = CompositeConfig(),
                       progress: Progress = None, compile_unet: bool = False) -> tuple[InversionOutcome, Reconstruction]:
    """Reconstruction (edit prompt = source prompt) from the cache, with metrics against the input frames
    at working size: the VAE round trip alone (the floor), then the chosen path, then, with `compare`,
    the other two of: injected (the paper's method), exact (injected + the exact correction), plain DDIM;
    and at source resolution: the round trip and the chosen path scaled up as they are (`replace`) and
    the chosen path composited into the source frames (`residual`)."""
    outcome = run_inversion(components, clip, inversion, cache_dir=cache_dir, force=force, progress=progress,
                            compile_unet=compile_unet)
    entry = outcome.entry
    z0 = entry.read_latent(0)
    floor = source_reference(components, entry, progress)
    metrics = {"vae round trip": frame_metrics(clip.frames, floor)}
    paths = [config]
    if compare:
        paths += [config.model_copy(update=change) for change in
                  (dict(inject=True, exact=False), dict(inject=True, exact=True), dict(inject=False, exact=False))
                  if config.model_copy(update=change) != config]
    result = None
    for path_config in paths:
        path_result = edit(components, entry, path_config, feature_mode=inversion.feature_mode, progress=progress,
                           compile_unet=compile_unet)
        result = result or path_result
        metrics[_path_label(path_config)] = {**frame_metrics(clip.frames, path_result.frames),
                                             "latent_mse": float(((path_result.latents - z0) ** 2).mean())}
    label = _path_label(config)
    replace = composite.model_copy(update={"mode": "replace"})
    residual = composite.model_copy(update={"mode": "residual"})
    candidates = {"vae round trip, replace": (floor, replace), f"{label}, replace": (result.frames, replace),
                  f"{label}, residual": (result.frames, residual)}
    source_metrics = source_resolution_metrics(clip, candidates, floor, progress)
    return outcome, Reconstruction(metrics, result, floor, source_metrics)
