"""`diffferv presets | probe`: what the edits are, and what diffferv will make of a video."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from diffferv_cli.cli import ModelOpt, console, err_console
from diffferv_cli.config import DEFAULT_MODEL, ClipSpec, default
from diffferv_cli.errors import UserError

ClipArg = Annotated[Path, typer.Argument(help="Input video.", show_default=False)]
StartOpt = Annotated[int, typer.Option("--start", help="First frame (0-based).")]
FramesOpt = Annotated[int | None, typer.Option("--frames", help="Number of frames (default: all).")]
StrideOpt = Annotated[int, typer.Option("--stride", help="Take every n-th frame.")]
SizeOpt = Annotated[int | None, typer.Option(
    "--size", help="Short side of the working size (default: the model's own, 512 for SD 1.x, 768 for SD 2.x 768-v, "
    "1024 for SDXL).", show_default=False)]
MultipleOpt = Annotated[int | None, typer.Option("--multiple", help="Working sides are multiples of this (default: what --model needs, 64 for SD1.5, 16 for tiny-random).")]
PresetDirOpt = Annotated[list[Path] | None, typer.Option(
    "--dir", "--preset-dir", metavar="DIR", help="Also list the presets in this folder (searched before the built-ins); repeat for "
    f"several (default: $DIFFFERV_PRESETS, folders separated by {os.pathsep!r}).", show_default=False)]


def size_multiple(model: str) -> int:
    """What the working sides must be multiples of for `model`'s UNet: the VAE divides by 8 and each
    UNet down block by 2 more, so SD 1.x/2.x (3 halvings) need 64, SDXL (2) 32, `tiny-random` (1) 16."""
    from diffferv_cli.models.geometry import model_geometry

    return model_geometry(model)[0] if model else 64


def clip_spec(start: int, frames: int | None, stride: int, size: int | None, multiple: int | None = None, *,
              model: str | None = None) -> ClipSpec:
    """The ClipSpec for CLI options: the one function `probe`, `invert`, `edit` and `reconstruct` use,
    so that `probe --model M` shows the working size `invert --model M` will use. `multiple` defaults
    to `size_multiple(model)`. Invalid values are a one-sentence `UserError`."""
    if multiple is None:
        multiple = size_multiple(model or "")
    if size is None:  # the model's native size (models/geometry.py)
        from diffferv_cli.models.geometry import model_geometry

        size = model_geometry(model)[1] if model else default(ClipSpec, "short_side")
    try:
        return ClipSpec(start=start, frames=frames, stride=stride, short_side=size, multiple=multiple)
    except ValueError as err:
        problem = err.errors()[0]
        field = problem["loc"][0] if problem["loc"] else "size"
        message = problem["msg"].removeprefix("Value error, ")
        raise UserError(f"Invalid --{field}: {message}.".replace("--short_side", "--size")) from None


def presets_cmd(folders: PresetDirOpt = None) -> None:
    """List the edit presets (--dir folders, then the built-ins). A file that does not read is named with
    its reason below the table, and the command then exits with code 2."""
    from diffferv_cli.editing.presets import builtin_dir, list_presets, preset_folders

    listing = list_presets(preset_folders(folders))
    table = Table("name", "tau_app", "guidance", "edit prompt", "description", "from")
    for preset in listing.presets:
        folder = listing.folders[preset.name]
        table.add_row(preset.name, f"{preset.tau_app:g}", f"{preset.guidance:g}", preset.prompts()[1],
                      preset.description, "built-in" if folder == builtin_dir() else str(folder))
    console.print(table)
    for path, reason in listing.problems:
        err_console.print(f"Skipped {path}: {reason}", style="yellow", markup=False, highlight=False, soft_wrap=True)
    if listing.problems:
        count = len(listing.problems)
        raise UserError(f"{count} preset file{'s' if count > 1 else ''} could not be read (named above); fix or "
                        "remove them, the presets in the table work.")


def probe_cmd(clip: ClipArg, start: StartOpt = default(ClipSpec, "start"), frames: FramesOpt = default(ClipSpec, "frames"),
              stride: StrideOpt = default(ClipSpec, "stride"), size: SizeOpt = None,
              model: ModelOpt = DEFAULT_MODEL,
              multiple: MultipleOpt = None) -> None:
    """Show a video's properties and the frames and working size diffferv would use (for --model)."""
    from diffferv_cli.video.geometry import frame_selection, working_geometry
    from diffferv_cli.video.probe import probe

    spec = clip_spec(start, frames, stride, size, multiple, model=model)
    info = probe(clip)
    indices = frame_selection(info.frame_count, spec, name=clip.name)
    geometry = working_geometry((info.width, info.height), spec)
    rate = f"{info.fps:.3f} fps ({info.fps_fraction})" + (", variable: average" if info.variable_fps else "")
    table = Table("property", "value", title=str(clip), show_header=False)
    table.add_row("size", f"{info.width}x{info.height}" + (f" (stored rotated {info.rotation}°)" if info.rotation else ""))
    table.add_row("codec", info.codec)
    table.add_row("frame rate", rate)
    table.add_row("frames", f"{info.frame_count} ({info.duration:.3f} s)")
    table.add_row("audio", "yes" if info.has_audio else "no")
    shown = ", ".join(map(str, indices)) if len(indices) <= 8 else \
        f"{', '.join(map(str, indices[:3]))}, ..., {', '.join(map(str, indices[-2:]))}"
    table.add_row("selected", f"{len(indices)} frames: {shown} (at {info.fps / spec.stride:.3f} fps)")
    left, top, right, bottom = geometry.crop
    fit = "none" if geometry.crop == (0, 0, 0, 0) else (
        f"{'pad' if min(geometry.crop) < 0 else 'crop'} left {abs(left)}, top {abs(top)}, "
        f"right {abs(right)}, bottom {abs(bottom)}")
    table.add_row("working size", f"{geometry.working_size[0]}x{geometry.working_size[1]} (scaled to "
                  f"{geometry.scaled_size[0]}x{geometry.scaled_size[1]}, {fit})")
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command("presets", epilog="Examples: diffferv presets  |  diffferv presets --dir ~/presets")(presets_cmd)
    app.command("probe", epilog="Examples: diffferv probe clip.mp4  |  diffferv probe clip.mp4 --frames 32 --stride 2 --model stabilityai/stable-diffusion-xl-base-1.0")(probe_cmd)
