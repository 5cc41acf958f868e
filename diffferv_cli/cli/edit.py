"""`diffferv invert | edit | reconstruct`: the main job."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from diffferv_cli.cli import (
    CacheOpt,
    ClipSkipOpt,
    DeviceOpt,
    DtypeOpt,
    LoraOpt,
    ModelOpt,
    PredictionOpt,
    PresetDirOpt,
    console,
    err_console,
    lora_options,
    one_of,
)
from diffferv_cli.cli.video import SizeOpt  # one definition for probe, invert, edit and reconstruct
from diffferv_cli.config import (
    DEFAULT_MODEL,
    ClipSpec,
    CompositeConfig,
    EditConfig,
    InversionConfig,
    TemporalConfig,
    choices,
    default,
)
from diffferv_cli.errors import UserError

ClipArg = Annotated[Path, typer.Argument(help="Input video.", show_default=False)]
StartOpt = Annotated[int, typer.Option("--start", help="First frame (0-based).")]
FramesOpt = Annotated[int | None, typer.Option("--frames", help="Number of frames (default: all).")]
StrideOpt = Annotated[int, typer.Option("--stride", help="Take every n-th frame.")]
PromptOpt = Annotated[str | None, typer.Option("--prompt", help=f"Source prompt (default: {default(InversionConfig, 'prompt')!r}).")]
StepsOpt = Annotated[int, typer.Option("--steps", help="DDIM steps T.")]
WindowOpt = Annotated[int, typer.Option("--window", help="SWCFA window w (frames).")]
NoSwcfaOpt = Annotated[bool, typer.Option("--no-swcfa", help="Per-frame self-attention instead of SWCFA (ablation).")]
NoTtaOpt = Annotated[bool, typer.Option("--no-tta", help="No trajectory attention (ablation).")]
FeaturesOpt = Annotated[str, typer.Option("--features", help="recompute (only latents on disk) or disk (features on disk).")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Recompute the inversion even if cached.")]
CompileOpt = Annotated[bool, typer.Option("--compile", help="Run the UNet through torch.compile (one graph for every step; pays off on long runs).")]
FlowOpt = Annotated[str, typer.Option("--flow-preset", help="OpenCV DIS preset: ultrafast, fast, medium.")]
WindowFramesOpt = Annotated[int, typer.Option(
    "--window-frames", help=f"Frames per temporal window: every UNet pass runs on overlapping windows of this "
    f"many frames, so memory is set by the window, not the clip's length (default {default(InversionConfig, 'window_frames')}: a 512x512 "
    "edit fits a 24 GB GPU). At least --window + 1; a clip this short or shorter is one window.")]
RegionOpt = Annotated[str, typer.Option("--region", help="Part of the frame that is edited: full, auto (the face's "
                                        "head box, found over the clip) or X,Y,W,H in pixels.")]
CompositeOpt = Annotated[str, typer.Option("--composite", help="residual (keep the source's pixels where the edit "
                                           "changed little) or replace (the working render scaled up).")]
ThresholdOpt = Annotated[float, typer.Option("--composite-threshold", help="Change (0-1) above which the edit "
                                             "replaces the source in residual compositing.")]
LosslessOpt = Annotated[bool, typer.Option("--lossless", help="Write lossless RGB H.264 (large files).")]
HtmlOpt = Annotated[bool, typer.Option("--html", help="Also write a self-contained HTML report beside each output "
                                       "(<output>.report.html): settings, metrics, frame strip, per-frame plots.")]

def _output_option(value: str) -> Path:
    """-o as given: an empty one is refused (it would mean the current folder without saying so)."""
    if not value.strip():
        raise typer.BadParameter("is empty; give a file or a folder (. for the current folder).")
    return Path(value)


# Option defaults, all read from the config models (a test checks that none is retyped).
START, FRAMES, STRIDE = default(ClipSpec, "start"), default(ClipSpec, "frames"), default(ClipSpec, "stride")
SIZE = None  # the model's own (models/geometry.py)
STEPS, FEATURES = default(InversionConfig, "steps"), default(InversionConfig, "feature_mode")
FLOW_PRESET, WINDOW_FRAMES = default(InversionConfig, "flow_preset"), default(InversionConfig, "window_frames")
WINDOW = default(TemporalConfig, "window")
NO_SWCFA, NO_TTA = not default(TemporalConfig, "swcfa"), not default(TemporalConfig, "tta")
COMPOSITE, THRESHOLD = default(CompositeConfig, "mode"), default(CompositeConfig, "threshold")
NO_INJECT, EXACT = not default(EditConfig, "inject"), default(EditConfig, "exact")


def _spec(start: int, frames: int | None, stride: int, size: int | None, model: str) -> ClipSpec:
    from diffferv_cli.cli.video import clip_spec  # the same working size `probe --model` shows

    return clip_spec(start, frames, stride, size, model=model)


def _inversion(prompt: str | None, steps: int, window: int, no_swcfa: bool, no_tta: bool, features: str,
               flow_preset: str, window_frames: int = WINDOW_FRAMES) -> InversionConfig:
    if window_frames < window + 1:
        raise UserError(f"--window-frames must be at least the SWCFA window + 1 = {window + 1} (windows overlap "
                        f"by at least the SWCFA window), got {window_frames}.")
    one_of("--features", features, choices(InversionConfig, "feature_mode"))
    one_of("--flow-preset", flow_preset, choices(InversionConfig, "flow_preset"))
    if prompt is not None and not prompt.strip():
        raise UserError(f"--prompt is empty; describe the clip (or leave --prompt out for "
                        f"{default(InversionConfig, 'prompt')!r}).")
    try:
        return InversionConfig(prompt=default(InversionConfig, "prompt") if prompt is None else prompt, steps=steps, feature_mode=features,
                               temporal=TemporalConfig(window=window, swcfa=not no_swcfa, tta=not no_tta),
                               flow_preset=flow_preset, window_frames=window_frames)
    except ValueError as err:
        raise UserError(f"Invalid inversion setting: {err.errors()[0]['loc'][-1]}: {err.errors()[0]['msg']}.") from None


def _composite(mode: str, threshold: float) -> CompositeConfig:
    one_of("--composite", mode, choices(CompositeConfig, "mode"))
    try:
        return CompositeConfig(mode=mode, threshold=threshold)
    except ValueError as err:
        raise UserError(f"Invalid --composite-threshold: {err.errors()[0]['msg']}.") from None


def _progress(plan_of=None):
    """The progress callback of a command (cli/progress.py): rich bars on a terminal, timestamped lines
    otherwise; `plan_of(frames, working_size)` gives the `job.JobPlan` it announces before decoding."""
    from diffferv_cli.cli.progress import job_progress

    return job_progress(err_console, plan_of)


def _check_device(device: str, dtype: str) -> None:
    """--device and --dtype, checked before the clip is decoded and the model loaded."""
    from diffferv_cli.models.devices import pick_device, pick_dtype

    pick_dtype(pick_device(device), dtype)


def _announce(report, clip_path: Path, spec: ClipSpec) -> None:
    """The command's work, named on `report` from the clip's frame count and working size (a probe: no
    frame is decoded)."""
    from diffferv_cli.video.geometry import check_region, frame_selection, working_geometry
    from diffferv_cli.video.probe import probe

    info = probe(clip_path)
    count = len(frame_selection(info.frame_count, spec, name=clip_path.name))
    region = check_region(spec.region, (info.width, info.height))
    geometry = working_geometry((region[2], region[3]) if region else (info.width, info.height), spec)
    report.clip_known(count, geometry.working_size)


def _load(clip_path: Path, spec: ClipSpec, model: str, device: str, dtype: str, report, region: str = "full",
          model_options: dict | None = None):
    """The clip and the model; `model_options`: load_components' keywords beyond model, device and dtype."""
    from diffferv_cli.editing.region import parse_region, resolve_region
    from diffferv_cli.models.loading import check_model, load_components
    from diffferv_cli.video.io import read_clip

    check_model(model)  # a missing file or a family diffferv cannot drive: said before any decoding

    wanted = parse_region(region)
    spec, note = resolve_region(clip_path, spec, wanted, progress=lambda d, t: report("faces", d, t))
    if note:
        err_console.print(note, highlight=False)
    _announce(report, clip_path, spec)
    clip = read_clip(clip_path, spec, progress=lambda d, t: report("decode", d, t))
    components = load_components(model, device=device, dtype=dtype, **(model_options or {}))
    if components.is_random:
        err_console.print(f"[yellow]Model: {components.label}[/yellow]")
    if wanted != "auto":  # --region auto searched every selected frame and said what it found
        _warn_without_face(clip)
    return clip, components


def _warn_without_face(clip) -> None:
    """One line when a quick look (3 frames) finds no face; DIFFFERV_NO_FACE_CHECK=1 skips the look."""
    import os

    if os.environ.get("DIFFFERV_NO_FACE_CHECK", "") not in ("", "0"):
        return
    from diffferv_cli.evaluation.faces import look_for_a_face

    check = look_for_a_face(clip.frames)
    if check is not None and check.found_in is None:
        numbers = ", ".join(str(clip.frame_indices[position]) for position in check.checked)
        err_console.print(f"Warning: no face found in frames {numbers} of {clip.info.path.name}; diffferv edits "
                          "faces, so expect little change.", style="yellow", markup=False, highlight=False,
                          soft_wrap=True)


def invert_cmd(
    clip: ClipArg,
    prompt: PromptOpt = None, model: ModelOpt = DEFAULT_MODEL,
    prediction_type: PredictionOpt = None, clip_skip: ClipSkipOpt = None, lora: LoraOpt = None,
    start: StartOpt = START, frames: FramesOpt = FRAMES, stride: StrideOpt = STRIDE, size: SizeOpt = SIZE,
    steps: StepsOpt = STEPS, window: WindowOpt = WINDOW, no_swcfa: NoSwcfaOpt = NO_SWCFA, no_tta: NoTtaOpt = NO_TTA,
    features: FeaturesOpt = FEATURES, flow_preset: FlowOpt = FLOW_PRESET,
    window_frames: WindowFramesOpt = WINDOW_FRAMES, cache_dir: CacheOpt = None,
    force: ForceOpt = False, device: DeviceOpt = "auto", dtype: DtypeOpt = "auto", region: RegionOpt = "full",
    compile_unet: CompileOpt = False,
) -> None:
    """Invert a clip (DDIM, temporal UNet) into the cache; later edits reuse it. Resumes if interrupted."""
    from diffferv_cli.editing.region import parse_region

    config = _inversion(prompt, steps, window, no_swcfa, no_tta, features, flow_preset, window_frames)
    parse_region(region)
    if prompt is None:
        err_console.print(f"Source prompt: {config.prompt!r} (the default; set it with --prompt)")
    spec = _spec(start, frames, stride, size, model)
    _check_device(device, dtype)
    loras = lora_options(lora)  # each file checked before any frame is decoded
    from diffferv_cli.editing.job import job_plan

    with _progress(lambda count, working: job_plan(count, working, config)) as report:
        video, components = _load(clip, spec, model, device, dtype, report, region,
                                   dict(prediction_type=prediction_type, clip_skip=clip_skip, loras=loras))
        from diffferv_cli.editing.job import run_inversion

        outcome = run_inversion(components, video, config, cache_dir=cache_dir, force=force, progress=report,
                                compile_unet=compile_unet)
    state = "reused (already cached)" if outcome.steps_run == 0 else f"{outcome.steps_run} steps run"
    console.print(f"Inversion {state}: {outcome.entry.folder} ({outcome.entry.disk_bytes() / 1e6:.1f} MB)")


@dataclass(frozen=True)
class EditRequest:
    """`edit`'s options (`options`, by parameter name) checked and built into the configs the library takes,
    before any work: what `edit` runs, and what `batch` builds for each job."""

    options: dict
    spec: ClipSpec
    inversion: InversionConfig
    edits: list[tuple[str, EditConfig]]
    composite: CompositeConfig
    loras: list[tuple[Path, float]]


def edit_request(
    clip: ClipArg,
    preset: Annotated[list[str] | None, typer.Option("--preset", "-p", help="Preset name or .toml file; repeat for several edits from one inversion.")] = None,
    preset_dir: PresetDirOpt = None,
    prompt_edit: Annotated[str | None, typer.Option("--prompt-edit", help="Edit prompt (instead of a preset).")] = None,
    subject: Annotated[str | None, typer.Option("--subject", help="Fills {subject} in preset prompts (default: the preset's own subject, 'person' unless it sets one).")] = None,
    tau_app: Annotated[float | None, typer.Option("--tau-app", help="Appearance features (SWCFA Q,K) are injected in the first round(tau*T) steps, the noisiest (preset default). 0 turns only them off.")] = None,
    tau_motion: Annotated[float, typer.Option("--tau-motion", help="Same for motion features (TTA Q,K); stays on with --tau-app 0.")] = default(EditConfig, "tau_motion"),
    tau_cross: Annotated[float, typer.Option("--tau-cross", help="Same for shared-word cross-attention maps; stays on with --tau-app 0.")] = default(EditConfig, "tau_cross"),
    guidance: Annotated[float | None, typer.Option("--guidance", "-g", help=f"Guidance g (preset default, else {default(EditConfig, 'guidance'):g}).")] = None,
    no_inject: Annotated[bool, typer.Option("--no-inject", help="Turn all injection off (appearance, motion, cross maps): plain DDIM editing.")] = NO_INJECT,
    exact: Annotated[bool, typer.Option("--exact", help="Correct the edit path with the cached inversion path.")] = EXACT,
    out: Annotated[Path | None, typer.Option("--out", "-o", parser=_output_option, metavar="PATH", help="Output file (one edit) or folder.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output file.")] = False,
    side_by_side: Annotated[bool, typer.Option("--side-by-side", help="Also write original|edited.")] = False,
    prompt: PromptOpt = None, model: ModelOpt = DEFAULT_MODEL,
    prediction_type: PredictionOpt = None, clip_skip: ClipSkipOpt = None, lora: LoraOpt = None,
    start: StartOpt = START, frames: FramesOpt = FRAMES, stride: StrideOpt = STRIDE, size: SizeOpt = SIZE,
    steps: StepsOpt = STEPS, window: WindowOpt = WINDOW, no_swcfa: NoSwcfaOpt = NO_SWCFA, no_tta: NoTtaOpt = NO_TTA,
    features: FeaturesOpt = FEATURES, flow_preset: FlowOpt = FLOW_PRESET,
    window_frames: WindowFramesOpt = WINDOW_FRAMES, cache_dir: CacheOpt = None,
    force: ForceOpt = False, device: DeviceOpt = "auto", dtype: DtypeOpt = "auto", region: RegionOpt = "full",
    compile_unet: CompileOpt = False,
    composite: CompositeOpt = COMPOSITE, composite_threshold: ThresholdOpt = THRESHOLD, lossless: LosslessOpt = False,
    html: HtmlOpt = False,
) -> EditRequest:
    """Edit a clip with presets or a prompt (inverts first when the cache has no inversion)."""
    options = dict(locals())
    from diffferv_cli.editing.presets import load_preset, preset_folders
    from diffferv_cli.editing.region import parse_region

    compositing = _composite(composite, composite_threshold)
    parse_region(region)

    if prompt_edit is not None and not prompt_edit.strip():
        raise UserError("--prompt-edit is empty; say what the edited clip shows (or use --preset NAME).")
    if not preset and not prompt_edit:
        raise UserError("Say what to edit: --preset NAME (see `diffferv presets`) or --prompt-edit TEXT.")
    edits: list[tuple[str, str, float, float]] = []  # label, edit prompt, tau_app, guidance
    source_prompts = set()
    subjects: dict[str, str] = {}  # preset name -> the subject that filled its prompts
    folders = preset_folders(preset_dir) if preset else []
    for name in preset or []:
        loaded = load_preset(name, folders)
        subjects[loaded.name] = subject or loaded.subject
        source, edited = loaded.prompts(subject)
        source_prompts.add(source)
        edits.append((loaded.name, edited, tau_app if tau_app is not None else loaded.tau_app,
                      guidance if guidance is not None else loaded.guidance))
    if prompt_edit:
        edits.append(("edit", prompt_edit, tau_app if tau_app is not None else default(EditConfig, "tau_app"),
                      guidance if guidance is not None else default(EditConfig, "guidance")))
    if prompt is None and len(source_prompts) == 1:
        prompt = source_prompts.pop()
    inversion = _inversion(prompt, steps, window, no_swcfa, no_tta, features, flow_preset, window_frames)
    for label, text, _, _ in edits:
        if text == inversion.prompt:
            what = f"--prompt-edit {text!r}" if label == "edit" else f"preset {label!r} with --subject {subjects[label]!r}"
            raise UserError(f"Nothing to edit: {what} gives the edit prompt {text!r}, the same as the source "
                            "prompt; choose another preset, subject or prompt (`diffferv reconstruct` rebuilds "
                            "the input).")
    try:
        configs = [(label, EditConfig(prompt_edit=text, tau_app=tau, tau_motion=tau_motion, tau_cross=tau_cross,
                                      guidance=g, inject=not no_inject, exact=exact))
                   for label, text, tau, g in edits]
    except ValueError as err:
        raise UserError(f"Invalid edit setting: {err.errors()[0]['loc'][-1]}: {err.errors()[0]['msg']}.") from None
    spec = _spec(start, frames, stride, size, model)
    loras = lora_options(lora)  # each file checked before any frame is decoded
    return EditRequest(options, spec, inversion, configs, compositing, loras)


@functools.wraps(edit_request)  # edit's options and help are edit_request's signature and docstring
def edit_cmd(**options) -> None:
    request = edit_request(**options)
    clip, out, overwrite, side_by_side = (options[name] for name in ("clip", "out", "overwrite", "side_by_side"))
    device, dtype, region, model = (options[name] for name in ("device", "dtype", "region", "model"))
    spec, inversion, configs, compositing = request.spec, request.inversion, request.edits, request.composite
    prediction_type, clip_skip, loras = options["prediction_type"], options["clip_skip"], request.loras
    cache_dir, force, lossless, compile_unet = (options[name] for name in ("cache_dir", "force", "lossless",
                                                                          "compile_unet"))
    from diffferv_cli.editing.job import edit_outputs, job_plan, run_edits, side_by_side_path

    targets = edit_outputs(clip, [label for label, _ in configs], out, overwrite=overwrite, side_by_side=side_by_side)
    reports = _report_paths(clip, targets, overwrite) if options["html"] else {}
    _claim([*targets, *(side_by_side_path(target) for target in targets if side_by_side), *reports.values()])
    targets = edit_outputs(clip, [label for label, _ in configs], out, overwrite=overwrite, side_by_side=side_by_side)
    reports = _report_paths(clip, targets, overwrite) if options["html"] else {}  # checked again, now held
    _check_device(device, dtype)
    with _progress(lambda count, working: job_plan(count, working, inversion, configs)) as report:
        video, components = _load(clip, spec, model, device, dtype, report, region,
                                   dict(prediction_type=prediction_type, clip_skip=clip_skip, loras=loras))
        outcome, written = run_edits(components, video, inversion, configs, cache_dir=cache_dir, force=force,
                                     out=out, overwrite=overwrite, side_by_side=side_by_side,
                                     composite=compositing, lossless=lossless, progress=report,
                                     compile_unet=compile_unet)
    if outcome.steps_run == 0:
        console.print(f"Used the cached inversion {outcome.entry.folder}")
    for path in written:
        console.print(f"Wrote {path}")
    _write_reports(clip, reports)


def _claim(paths: list[Path]) -> None:
    """Hold `paths` for this command (`files.claim_outputs`): another command writing one is refused until
    this one ends; the leftovers of killed runs beside them are removed. The caller checks them again."""
    from diffferv_cli.files import check_distinct_targets, claim_outputs

    check_distinct_targets(paths)
    claim_outputs(paths)


def _report_paths(clip: Path, outputs: list[Path], overwrite: bool) -> dict[Path, Path]:
    """output -> where `--html` writes its report, each checked like an output before any work."""
    from diffferv_cli.editing.job import check_writable
    from diffferv_cli.evaluation.html import html_path_beside

    reports = {output: html_path_beside(output) for output in outputs}
    for page in reports.values():
        check_writable(page, [clip], overwrite, suffixes=(".html",))
    return reports


def _write_reports(clip: Path, reports: dict[Path, Path]) -> None:
    """`eval --html` of each output against the clip (frames compared at native size up to a short side
    of 720, else at 512)."""
    from diffferv_cli.config import EvalConfig
    from diffferv_cli.evaluation.html import write_eval_report
    from diffferv_cli.evaluation.report import native_size

    for output, page in reports.items():
        size = None if min(native_size(output)) <= 720 else 512
        try:
            with err_console.status(f"report on {output.name}") as status:
                write_eval_report(clip, output, EvalConfig(size=size), page,
                                  progress=lambda stage, done, total: status.update(f"{stage} {done}/{total}"))
        except UserError as err:  # the edit is written; say why its report is not
            err_console.print(f"No report on {output}: {err}", style="yellow", markup=False, highlight=False)
            continue
        console.print(f"Wrote {page}")


def reconstruct_cmd(
    clip: ClipArg,
    out: Annotated[Path | None, typer.Option("--out", "-o", parser=_output_option, metavar="PATH", help="Output video.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite")] = False,
    plain: Annotated[bool, typer.Option("--plain", help="Plain DDIM reconstruction (no injection).")] = False,
    exact: Annotated[bool, typer.Option("--exact", help="Add the exact correction (not in the paper): reconstruction is then bounded by the VAE round trip.")] = EXACT,
    compare: Annotated[bool, typer.Option("--compare", help="Also run and print the other paths (injected, --exact, plain DDIM).")] = False,
    prompt: PromptOpt = None, model: ModelOpt = DEFAULT_MODEL,
    prediction_type: PredictionOpt = None, clip_skip: ClipSkipOpt = None, lora: LoraOpt = None,
    start: StartOpt = START, frames: FramesOpt = FRAMES, stride: StrideOpt = STRIDE, size: SizeOpt = SIZE,
    steps: StepsOpt = STEPS, window: WindowOpt = WINDOW, no_swcfa: NoSwcfaOpt = NO_SWCFA, no_tta: NoTtaOpt = NO_TTA,
    features: FeaturesOpt = FEATURES, flow_preset: FlowOpt = FLOW_PRESET,
    window_frames: WindowFramesOpt = WINDOW_FRAMES, cache_dir: CacheOpt = None,
    force: ForceOpt = False, device: DeviceOpt = "auto", dtype: DtypeOpt = "auto", region: RegionOpt = "full",
    compile_unet: CompileOpt = False,
    composite: CompositeOpt = COMPOSITE, composite_threshold: ThresholdOpt = THRESHOLD, lossless: LosslessOpt = False,
    html: HtmlOpt = False,
) -> None:
    """Reconstruct a clip from its cached inversion (the paper's path: preservation-feature injection) and
    print MSE / PSNR / SSIM against the input, at working size and at source resolution (scaled up as it
    is, and composited)."""
    from diffferv_cli.editing.job import (
        check_writable,
        job_plan,
        make_output_folder,
        output_path,
        path_label,
        reconstruction_paths,
        run_reconstruction,
        write_result,
    )
    from diffferv_cli.editing.region import parse_region

    compositing = _composite(composite, composite_threshold)
    parse_region(region)
    inversion = _inversion(prompt, steps, window, no_swcfa, no_tta, features, flow_preset, window_frames)
    if plain and exact:
        raise UserError("--plain and --exact exclude each other: --exact corrects the injected path.")
    config = EditConfig(prompt_edit=inversion.prompt, inject=not plain, exact=exact)
    spec = _spec(start, frames, stride, size, model)
    make_output_folder(out)
    target = output_path(clip, "reconstruct", out, 1)
    check_writable(target, [clip], overwrite)
    report_page = _report_paths(clip, [target], overwrite)[target] if html else None
    _claim([target] + ([report_page] if report_page else []))
    check_writable(target, [clip], overwrite)  # again, now that no other command can write it
    report_page = _report_paths(clip, [target], overwrite)[target] if html else None
    _check_device(device, dtype)
    loras = lora_options(lora)  # each file checked before any frame is decoded
    paths = [(path_label(path), path) for path in reconstruction_paths(config, compare)]
    with _progress(lambda count, working: job_plan(count, working, inversion, paths, "reconstruct")) as report:
        video, components = _load(clip, spec, model, device, dtype, report, region,
                                   dict(prediction_type=prediction_type, clip_skip=clip_skip, loras=loras))
        _, reconstruction = run_reconstruction(components, video, inversion, config, cache_dir=cache_dir,
                                               force=force, compare=compare, composite=compositing,
                                               progress=report, compile_unet=compile_unet)
        from diffferv_cli.editing.settings import edit_settings

        settings = edit_settings(components, video, inversion, config, path_label(config), compositing, "reconstruct")
        write_result(video, reconstruction.result.frames, target, composite=compositing,
                     reference=reconstruction.reference, lossless=lossless, progress=report, settings=settings)
    working = "x".join(str(side) for side in video.geometry.working_size)
    table = Table("path", "MSE", "PSNR (dB)", "SSIM", "latent MSE", title=f"Reconstruction vs input (working size {working})")
    for label, values in reconstruction.metrics.items():
        latent = values.get("latent_mse")
        table.add_row(label, f"{values['mse']:.6f}", f"{values['psnr']:.2f}", f"{values['ssim']:.4f}",
                      "-" if latent is None else f"{latent:.2e}")
    console.print(table)
    table = Table("path", "output", "MSE", "PSNR (dB)", "SSIM",
                  title=f"At source resolution ({video.info.width}x{video.info.height})")
    for label, values in reconstruction.source_metrics.items():
        path, mode = label.rsplit(", ", 1)
        table.add_row(path, mode, f"{values['mse']:.6f}", f"{values['psnr']:.2f}", f"{values['ssim']:.4f}")
    console.print(table)
    console.print(f"Wrote {target}")
    if report_page is not None:
        from diffferv_cli.evaluation.html import reconstruction_page, write_page

        with err_console.status("report"):
            write_page(report_page, reconstruction_page(video, reconstruction, compositing, settings))
        console.print(f"Wrote {report_page}")


def register(app: typer.Typer) -> None:
    app.command("invert", epilog="Examples: diffferv invert clip.mp4 --prompt 'a photo of a woman'  |  diffferv invert clip.mp4 --frames 48 --model fine-tune.safetensors")(invert_cmd)
    app.command("edit", epilog="Examples: diffferv edit clip.mp4 -p age  |  diffferv edit clip.mp4 -p age -p blond -o out/  |  diffferv edit clip.mp4 --prompt-edit 'a photo of an old woman' --tau-app 0.8 --side-by-side  |  diffferv edit wide.mp4 -p glasses --region auto --lora person.safetensors:0.8")(edit_cmd)
    app.command("reconstruct", epilog="Examples: diffferv reconstruct clip.mp4 --compare  |  diffferv reconstruct clip.mp4 --exact --lossless -o rec.mp4")(reconstruct_cmd)
