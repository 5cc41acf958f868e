"""The main job end to end: clip -> (cached) inversion -> edits -> videos. The CLI calls these."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from diffferv_cli.config import CompositeConfig, EditConfig, InversionConfig
from diffferv_cli.editing.inversion import InversionOutcome, clip_windows, invert, kept_clause
from diffferv_cli.editing.sampling import (
    DEFAULT_MAX_BATCH_ROWS,
    EditResult,
    edit,
    edit_groups,
    edit_shared,
    largest_window,
    shared_layout,
)
from diffferv_cli.editing.settings import edit_settings
from diffferv_cli.editing.vae import DecodedFrames, decode_latents
from diffferv_cli.errors import Interrupted, UserError

Progress = Callable[[str, int, int], None] | None


@dataclass
class Reconstruction:
    """Frames here are sequences of (H, W, 3) uint8 at working size, decoded a few at a time when read
    (`vae.DecodedFrames`; `np.asarray` gives them all)."""

    metrics: dict[str, dict[str, float]]  # label -> {"mse", "psnr", "ssim", "latent_mse"}, at working size
    result: EditResult
    reference: DecodedFrames | np.ndarray | None = None  # R, the decode of z_0 (working size)
    source_metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # at source resolution
    paths: dict[str, DecodedFrames | np.ndarray] = field(default_factory=dict)  # label -> frames at working size
    source_series: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # source_metrics per frame
    working_series: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # metrics per frame


@dataclass(frozen=True)
class PlannedRun:
    """One UNet loop of a command: the inversion, the edits sampled together (one edit, or a group sharing
    one source branch), or one reconstruction path."""

    name: str  # the head of its progress stage: "invert", "edit age + blond", "reconstruct exact (1 of 3)"
    steps: int
    windows: int
    frames_per_pass: int  # frames through the UNet in one pass over all windows (overlaps counted twice)
    branches: int  # prompt branches: batch rows per frame
    labels: tuple[str, ...] = ()  # the edits (reconstruction paths) this loop samples

    @property
    def units(self) -> int:
        """Frame rows through the UNet over the whole loop, what its time is near proportional to."""
        return self.steps * self.frames_per_pass * self.branches


@dataclass(frozen=True)
class JobPlan:
    """A command's whole work, known before decoding: frames, working size, and its UNet loops."""

    frames: int
    working_size: tuple[int, int]  # width, height
    runs: tuple[PlannedRun, ...]

    @property
    def units(self) -> int:
        return sum(run.units for run in self.runs)

    def describe(self) -> str:
        """"invert (or reuse the cache) + 3 edits (age, blond, glasses) sampled together of 472 frames at
        512x768: 50 steps × 12 windows each = 1,200 window passes"."""
        first, *rest = self.runs
        what = "invert"
        if rest:
            kind = rest[0].name.split()[0]
            labels = [label for run in rest for label in run.labels]
            noun = {"edit": "edit", "reconstruct": "reconstruction path"}.get(kind, kind)
            what = f"invert (or reuse the cache) + {len(labels)} {noun}{'s' if len(labels) > 1 else ''} ({', '.join(labels)})"
            if len(rest) < len(labels):  # some share a loop (and its source branch)
                what += " sampled together" if len(rest) == 1 else f" in {len(rest)} shared loops"
        passes = sum(run.steps * run.windows for run in self.runs)
        width, height = self.working_size
        return (f"{what} of {self.frames} frames at {width}x{height}: {first.steps} steps × {first.windows} "
                f"window{'s' if first.windows != 1 else ''}{' each' if rest else ''} = {passes:,} window passes")


def run_name(kind: str, label: str, index: int, count: int) -> str:
    """The name on the progress of one of `count` edits (or reconstruction paths): "edit age (2 of 3)"."""
    name = kind if label == kind else f"{kind} {label}"
    return f"{name} ({index} of {count})" if count > 1 else name


def loop_name(kind: str, labels: list[str], numbers: list[int], count: int) -> str:
    """The name on the progress of one UNet loop sampling the edits `labels` (numbered `numbers` of
    `count`) together: `run_name` for one edit, "edit age + blond + glasses" for all of them, "edit age +
    blond (1-2 of 3)" for a group of them."""
    if len(labels) == 1:
        return run_name(kind, labels[0], numbers[0], count)
    name = f"{kind} {' + '.join(labels)}"
    return name if len(labels) == count else f"{name} ({numbers[0]}-{numbers[-1]} of {count})"


def job_plan(frames: int, working_size: tuple[int, int], inversion: InversionConfig,
             runs: list[tuple[str, EditConfig]] = (), kind: str = "edit",
             max_batch_rows: int = DEFAULT_MAX_BATCH_ROWS) -> JobPlan:
    """The plan of inverting `frames` frames and then running each (label, config) of `runs`: edits in
    the groups `run_edits` samples together (`sampling.edit_groups`), reconstruction paths one by one."""
    windows = clip_windows(frames, inversion)
    frames_per_pass = sum(window.frames for window in windows)
    configs = [config for _, config in runs]
    groups = [[index] for index in range(len(runs))]
    if kind == "edit":
        groups = edit_groups(configs, inversion.prompt, inversion.feature_mode,
                             window_frames=max(window.frames for window in windows), max_batch_rows=max_batch_rows)

    def planned(group: list[int]) -> PlannedRun:
        labels = [runs[index][0] for index in group]
        layout = shared_layout([configs[index] for index in group], inversion.prompt, inversion.feature_mode)
        return PlannedRun(loop_name(kind, labels, [index + 1 for index in group], len(runs)), inversion.steps,
                          len(windows), frames_per_pass, len(layout.branches), tuple(labels))

    return JobPlan(frames, tuple(working_size), (PlannedRun("invert", inversion.steps, len(windows), frames_per_pass, 1),
                                                 *(planned(group) for group in groups)))


def _named(progress: Progress, name: str, kind: str = "edit") -> Progress:
    """`progress` with the stages of one edit named: its UNet loop's "edit: 50 steps × 12 windows" as
    "edit age (2 of 3): 50 steps × 12 windows", the others as "write: edit age (2 of 3)"."""
    if progress is None:
        return None

    def report(stage: str, done: int, total: int) -> None:
        head, colon, detail = stage.partition(":")
        progress(f"{name}{colon}{detail}" if head == "edit" else f"{stage}: {name}", done, total)

    return report


def output_path(clip_path: Path, label: str, out: Path | None, count: int) -> Path:
    """`out` itself for one output, else beside the input; a folder (also one yet to be made: a name
    without an extension) gets `<stem>.<label>.mp4`."""
    if out is not None and (out.is_dir() or out.suffix == ""):
        return out / f"{clip_path.stem}.{label}.mp4"
    if out is not None:
        if count > 1:
            raise UserError("Several edits need -o to be a folder, not a file.")
        return out
    return clip_path.with_name(f"{clip_path.stem}.{label}.mp4")


def side_by_side_path(path: Path) -> Path:
    """Where `--side-by-side` writes the original|edited comparison of the output `path`."""
    return path.with_suffix(".side-by-side.mp4")


def check_writable(path: Path, inputs: list[Path], overwrite: bool, suffixes: tuple[str, ...] | None = None) -> None:
    """Fail before any work (`files.check_output_target`): never over an input or a link to one, never over
    an existing file unless asked, never over a device or folder; the suffix one of `suffixes` (default:
    the video writer's)."""
    from diffferv_cli.files import check_output_target
    from diffferv_cli.video.io import OUTPUT_SUFFIXES

    check_output_target(path, inputs, overwrite, OUTPUT_SUFFIXES if suffixes is None else suffixes)


def make_output_folder(out: Path | None) -> None:
    """Create the folder `-o` names (a name without an extension) when it does not exist yet."""
    if out is None or out.suffix or out.is_dir():
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"Cannot create the output folder {out} ({err.strerror}); choose another -o.") from None


def edit_outputs(clip_path: Path, labels: list[str], out: Path | None, *, overwrite: bool = False,
                 side_by_side: bool = False) -> list[Path]:
    """Where each edit goes, checked before any work (`check_writable`), the -o folder made if missing."""
    from diffferv_cli.files import check_distinct_targets

    targets = [output_path(clip_path, label, out, len(labels)) for label in labels]
    every = targets + ([side_by_side_path(target) for target in targets] if side_by_side else [])
    check_distinct_targets(every)
    make_output_folder(out)
    for target in every:
        check_writable(target, [clip_path], overwrite)
    return targets


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
                 lossless: bool = False, progress: Progress = None, settings: dict | None = None) -> list[Path]:
    """The edited frames at source resolution (composited as `composite` says, default `replace`;
    `reference` = R, the decode of the cached z_0, for residual compositing) with the source's audio
    and the frame selection (and `settings`, `editing.settings`) in its metadata; optionally the original|edited comparison at the output's
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
                           source_frames=selection, settings=settings, **common)]
    if side_by_side:
        written.append(write_side_by_side(clip, path, side_by_side_path(path), progress=common["progress"]))
    return written


def source_reference(components, entry, progress: Progress = None, ranks=None) -> DecodedFrames | np.ndarray | None:
    """R: the VAE decode of the cached source latent z_0, at working size (the input's round trip);
    split across `ranks` when given (None on the ranks other than 0)."""
    report = progress or (lambda stage, done, total: None)
    return decoded(components, entry.latent_rows(0), lambda d, t: report("decode R", d, t), ranks)


def decoded(components, latents, progress, ranks=None) -> DecodedFrames | np.ndarray | None:
    """The VAE decode of `latents` (m, 4, h, w: a tensor, or `cache.LatentRows` read a range at a time) as
    uint8 frames: in one process a `DecodedFrames` that decodes a few at a time as a writer reads them;
    under torch.distributed `ranks` each rank decodes its contiguous share of the frames and rank 0 gets
    them all, in order, in memory (None elsewhere)."""
    if ranks is None or ranks.world == 1:
        return DecodedFrames(components.vae, latents, progress=progress)
    share = ranks.share_of(len(latents))
    part = decode_latents(components.vae, latents[share], progress=progress) if share.stop > share.start else None
    parts = ranks.gather(part)
    return np.concatenate([part for part in parts if part is not None]) if ranks.main else None


def run_inversion(components, clip, config: InversionConfig, *, cache_dir=None, force=False,
                  progress: Progress = None, compile_unet: bool = False) -> InversionOutcome:
    from diffferv_cli.temporal.ranks import from_environment

    return invert(components, clip, config, cache_dir=cache_dir, force=force, progress=progress,
                  compile_unet=compile_unet, ranks=from_environment(components.device))


def run_edits(components, clip, inversion: InversionConfig, edits: list[tuple[str, EditConfig]], *,
              cache_dir=None, force=False, out: Path | None = None, overwrite=False, side_by_side=False,
              composite: CompositeConfig = CompositeConfig(), lossless: bool = False,
              progress: Progress = None, compile_unet: bool = False,
              max_batch_rows: int = DEFAULT_MAX_BATCH_ROWS) -> tuple[InversionOutcome, list[Path]]:
    """Invert once (or reuse the cache), then sample the edits together, one source branch per UNet call
    for as many edits as `max_batch_rows` frame rows per call allow (`sampling.edit_groups`: each call
    holds branches x the largest window's frames), and decode and write each. Progress names each
    sampling loop (`loop_name`) and each edit's decode and write (`run_name`); an interrupt says what is
    kept (`errors.Interrupted`)."""
    targets = edit_outputs(clip.info.path, [label for label, _ in edits], out, overwrite=overwrite,
                           side_by_side=side_by_side)
    from diffferv_cli.temporal.ranks import from_environment

    ranks = from_environment(components.device)  # a torchrun job: every rank samples, rank 0 writes
    outcome = run_inversion(components, clip, inversion, cache_dir=cache_dir, force=force, progress=progress,
                            compile_unet=compile_unet)
    written: list[Path] = []
    finished = 0
    try:
        reference = (source_reference(components, outcome.entry, progress, ranks)  # every rank decodes a share
                     if composite.mode == "residual" else None)
        groups = edit_groups([config for _, config in edits], inversion.prompt, inversion.feature_mode,
                             window_frames=largest_window(outcome.entry), max_batch_rows=max_batch_rows)
        for group in groups:
            loop = _named(progress, loop_name("edit", [edits[index][0] for index in group],
                                              [index + 1 for index in group], len(edits)))
            results = edit_shared(components, outcome.entry, [edits[index][1] for index in group],
                                  feature_mode=inversion.feature_mode, progress=loop, decode=False,
                                  compile_unet=compile_unet, ranks=ranks)
            for index, result in zip(group, results, strict=True):
                label, config = edits[index]
                named = _named(progress, run_name("edit", label, index + 1, len(edits)))
                report = named or (lambda stage, done, total: None)
                frames = decoded(components, result.stored,
                                 lambda done, total, report=report: report("decode", done, total), ranks)
                if not ranks.main:  # its share of the decode is done; rank 0 composites and writes
                    continue
                settings = edit_settings(components, clip, inversion, config, label, composite)
                written += write_result(clip, frames, targets[index], side_by_side=side_by_side, composite=composite,
                                        reference=reference, lossless=lossless, progress=named, settings=settings)
                finished += 1
    except KeyboardInterrupt:
        kept = ["the inversion"] + ([f"{finished} of {len(edits)} edits"] if finished else [])
        raise Interrupted(kept_clause(kept, plural=finished > 0)) from None
    return outcome, written


def source_resolution_metrics(clip, candidates: dict[str, tuple[np.ndarray, CompositeConfig]],
                              reference: np.ndarray | None, progress: Progress = None) -> dict[str, dict[str, float]]:
    """MSE / PSNR / SSIM against the source frames at their own resolution of each candidate (edited
    working-size frames and how they are composited), in one streamed pass over the source frames."""
    return series_means(source_resolution_series(clip, candidates, reference, progress))


def series_means(series: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    return {label: {name: float(np.mean(values)) for name, values in metrics.items()}
            for label, metrics in series.items()}


def source_resolution_series(clip, candidates: dict[str, tuple[np.ndarray, CompositeConfig]],
                             reference: np.ndarray | None, progress: Progress = None) -> dict[str, dict[str, list[float]]]:
    """`source_resolution_metrics` frame by frame: label -> {"mse", "psnr", "ssim"} -> (m,) values."""
    return reconstruction_series(clip, {}, candidates, reference, progress)[1]


def path_label(config: EditConfig) -> str:
    return "exact" if config.exact else ("injected (paper)" if config.inject else "plain DDIM")


def reconstruction_paths(config: EditConfig, compare: bool = False) -> list[EditConfig]:
    """The chosen path first, then, with `compare`, the other two of: injected (the paper's method), exact
    (injected + the exact correction), plain DDIM."""
    paths = [config]
    if compare:
        paths += [config.model_copy(update=change) for change in
                  (dict(inject=True, exact=False), dict(inject=True, exact=True), dict(inject=False, exact=False))
                  if config.model_copy(update=change) != config]
    return paths


def run_reconstruction(components, clip, inversion: InversionConfig, config: EditConfig, *, cache_dir=None,
                       force=False, compare=False, composite: CompositeConfig = CompositeConfig(),
                       progress: Progress = None, compile_unet: bool = False) -> tuple[InversionOutcome, Reconstruction]:
    """Reconstruction (edit prompt = source prompt) from the cache, with metrics against the input frames
    at working size: the VAE round trip alone (the floor), then each path of `reconstruction_paths`; and
    at source resolution: the round trip scaled up as it is (`replace`), and each path both scaled up as
    it is and composited into the source frames (`residual`). Progress names each path
    ("reconstruct exact (2 of 3): ..."). Every metric comes from one pass over the frames, each decoded
    once, a few at a time."""
    outcome = run_inversion(components, clip, inversion, cache_dir=cache_dir, force=force, progress=progress,
                            compile_unet=compile_unet)
    entry = outcome.entry
    floor = source_reference(components, entry, progress)
    paths = reconstruction_paths(config, compare)
    results: dict[str, EditResult] = {}
    for index, path_config in enumerate(paths, 1):
        label = path_label(path_config)
        named = _named(progress, run_name("reconstruct", label, index, len(paths)))
        results[label] = edit(components, entry, path_config, feature_mode=inversion.feature_mode, progress=named,
                              decode=False, compile_unet=compile_unet)
    frames = {label: DecodedFrames(components.vae, result.stored) for label, result in results.items()}
    replace = composite.model_copy(update={"mode": "replace"})
    residual = composite.model_copy(update={"mode": "residual"})
    candidates = {"vae round trip, replace": (floor, replace)}
    for label in results:
        candidates.update({f"{label}, replace": (frames[label], replace), f"{label}, residual": (frames[label], residual)})
    working_series, source_series = reconstruction_series(clip, {"vae round trip": floor, **frames}, candidates,
                                                          floor, progress)
    metrics = series_means(working_series)
    z0 = entry.latent_rows(0)
    for label, result in results.items():
        metrics[label]["latent_mse"] = latent_mse(result.stored, z0)
    result = results[path_label(config)]
    result.frames = frames[path_label(config)]
    return outcome, Reconstruction(metrics, result, floor, series_means(source_series), frames, source_series,
                                   working_series)


def latent_mse(latents, reference, chunk: int = 64) -> float:
    """Mean squared difference of two clips' latents, read `chunk` frames at a time."""
    total, count = 0.0, 0
    for start in range(0, len(reference), chunk):
        difference = latents[start:start + chunk].double() - reference[start:start + chunk].double()
        total, count = total + float((difference ** 2).sum()), count + difference.numel()
    return total / max(count, 1)


def reconstruction_series(clip, working: dict, candidates: dict[str, tuple], reference,
                          progress: Progress = None) -> tuple[dict, dict]:
    """Per frame, in one pass over the input at working size and at source resolution: MSE / PSNR / SSIM
    of each of `working` (label -> frames at working size) against the input frames, and of each
    candidate (label -> (frames, how composited)) against the source frames. Each decoded sequence is
    read in order, so each frame is decoded once."""
    from diffferv_cli.editing.composite import composite_frame
    from diffferv_cli.evaluation.metrics import mse_per_frame, psnr_from_mse, ssim_per_frame
    from diffferv_cli.video.stream import stream_frames

    report = progress or (lambda stage, done, total: None)

    def record(values: dict, truth: np.ndarray, frame: np.ndarray) -> None:
        error = float(mse_per_frame(truth, frame)[0])
        values["mse"].append(error)
        values["psnr"].append(float(psnr_from_mse(error)))
        values["ssim"].append(float(ssim_per_frame(truth, frame)[0]))

    working_values = {label: {"mse": [], "psnr": [], "ssim": []} for label in working}
    source_values = {label: {"mse": [], "psnr": [], "ssim": []} for label in candidates}
    count = len(clip.frame_indices)
    sources = stream_frames(clip.info.path, clip.frame_indices, clip.spec.stride, info=clip.info)
    truths = iter(clip.frames) if working else None  # the input at working size: decoded only when compared
    for index, source in enumerate(sources):
        current = {label: frames[index] for label, frames in working.items()}
        if truths is not None:
            truth = next(truths)
            for label, frame in current.items():
                record(working_values[label], truth, frame)
        for label, (frames, config) in candidates.items():
            edited = next((current[name] for name, seq in working.items() if seq is frames), None)
            edited = frames[index] if edited is None else edited
            output = composite_frame(source, edited, None if reference is None else reference[index],
                                     clip.geometry, config, clip.spec.region)
            record(source_values[label], source, output)
        report("metrics", index + 1, count)
    return working_values, source_values
