"""`diffferv eval ORIGINAL EDITED`: the paper's metrics (section 4.2) as a table and JSON."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from diffferv_cli.cli import console, err_console, one_of
from diffferv_cli.config import EvalConfig, choices, default
from diffferv_cli.errors import UserError
from diffferv_cli.files import atomic_write_text, to_json

InputArg = Annotated[Path, typer.Argument(help="Video or folder of frames.", show_default=False)]


def _format(value: float | None) -> str:
    if value is None:
        return "-"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"


def register(app: typer.Typer) -> None:
    app.command("eval", epilog="Examples: diffferv eval clip.mp4 clip.age.mp4  |  diffferv eval clip.mp4 clip.age.mp4 --json metrics.json")(eval_command)


def eval_command(
    original: InputArg,
    edited: InputArg,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the metrics (and per-frame values) here.")] = None,
    start: Annotated[int, typer.Option("--start", help="First frame (0-based) of the edited video.")] = default(EvalConfig, "start"),
    frames: Annotated[int | None, typer.Option("--frames", help="Number of frames (default: all).")] = default(EvalConfig, "frames"),
    stride: Annotated[int, typer.Option("--stride", help="Take every n-th frame.")] = default(EvalConfig, "stride"),
    original_start: Annotated[int | None, typer.Option("--original-start", help="The original's frame shown as the edited video's frame 0 (default: read from the edited file, which diffferv writes it into).")] = default(EvalConfig, "original_start"),
    original_stride: Annotated[int | None, typer.Option("--original-stride", help="Original frames per edited frame (default: read from the edited file).")] = default(EvalConfig, "original_stride"),
    size: Annotated[int | None, typer.Option("--size", help="Compare at this short side (default: native size).")] = default(EvalConfig, "size"),
    similarity: Annotated[str, typer.Option("--identity-similarity", help="dlib (1 - distance) or cosine.")] = default(EvalConfig, "similarity"),
    no_temporal: Annotated[bool, typer.Option("--no-temporal", help="Skip the flow-warping error.")] = not default(EvalConfig, "temporal"),
    attribute_model: Annotated[Path | None, typer.Option("--attribute-model", help="Local image-classification model folder (for TACR/NAPR).")] = None,
    target_attribute: Annotated[str | None, typer.Option("--target-attribute", help="The edited attribute, one of the model's labels.")] = None,
    clip_model: Annotated[Path | None, typer.Option("--clip-model", help="Local CLIP model folder (for CLIP-IQA).")] = None,
    html_out: Annotated[Path | None, typer.Option("--html", help="Write a self-contained HTML report here: settings, metrics, a frame strip with heat maps, per-frame plots.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --json / --html file.")] = False,
) -> None:
    """Compare an edited video with its original: reconstruction, identity, temporal metrics."""
    if json_out is not None:
        _check_json_target(json_out, [original, edited], overwrite)
    if html_out is not None:
        _check_json_target(html_out, [original, edited], overwrite, option="--html")
    _run(original, edited, json_out, html_out=html_out, start=start, frames=frames, stride=stride, original_start=original_start,
         original_stride=original_stride, size=size, similarity=similarity, temporal=not no_temporal, attribute_model=attribute_model,
         target_attribute=target_attribute, clip_model=clip_model)


def _check_json_target(path: Path, inputs: list[Path], overwrite: bool, option: str = "--json") -> None:
    """Before any work: never over an input, never over an existing file without --overwrite."""
    for source in inputs:
        if path.exists() and source.exists() and path.resolve() == source.resolve():
            raise UserError(f"{option} {path} is one of the inputs; choose another file.")
    if path.is_dir():
        raise UserError(f"{option} {path} is a folder; give a file name.")
    if path.exists() and not overwrite:
        raise UserError(f"{path} already exists; pass --overwrite or another {option} file.")
    if not path.parent.is_dir():
        raise UserError(f"The folder of {option} {path} does not exist.")


def _run(original: Path, edited: Path, json_out: Path | None, html_out: Path | None = None, **options) -> None:
    from diffferv_cli.evaluation.report import evaluate

    one_of("--identity-similarity", options["similarity"], choices(EvalConfig, "similarity"))
    try:
        config = EvalConfig(**options)
    except ValueError as err:
        first = err.errors()[0]
        raise UserError(f"Invalid option --{str(first['loc'][-1]).replace('_', '-')}: {first['msg']}.") from None

    from diffferv_cli.evaluation.html import StripFrames

    strip = StripFrames() if html_out is not None else None
    keep = {} if strip is None else {"frames_hook": strip}  # the strip's frames, only for --html
    with err_console.status("evaluating") as status:
        report = evaluate(original, edited, config,
                          progress=lambda stage, done, total: status.update(f"{stage} {done}/{total}"), **keep)

    table = Table("metric", "value", "note", title=f"{report.frames} frames at {report.width}x{report.height}")
    for result in report.results:
        arrow = {"lower": " ↓", "higher": " ↑"}.get(result.better, "")
        table.add_row(f"{result.name}{arrow}", _format(result.value), result.note)
    console.print(table)
    shown = report.original_frames
    numbers = ", ".join(map(str, shown)) if len(shown) <= 6 else f"{shown[0]}, {shown[1]}, ..., {shown[-1]}"
    console.print(f"Original frames compared: {numbers} ({report.alignment})")
    if json_out is not None:
        try:
            atomic_write_text(json_out, to_json(report.to_json()))
        except OSError as err:
            raise UserError(f"Cannot write {json_out} ({err.strerror}).") from None
        console.print(f"wrote {json_out}")
    if html_out is not None:
        from diffferv_cli.evaluation.html import eval_page, write_page
        from diffferv_cli.video.metadata import read_settings

        write_page(html_out, eval_page(report, strip, read_settings(edited)))
        console.print(f"wrote {html_out}")
