"""Thin Typer commands: build a config, call the library, render with rich.

Command groups live beside this file (`cli_*.py`) and are registered here. Every command reports user
mistakes as one sentence on stderr with exit code 2 (see `errors.UserError`)."""

from __future__ import annotations

import errno
import functools
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from diffferv_cli.errors import UserError, os_error_message, os_reason
from diffferv_cli.files import release_outputs

# Under a launcher's ranks (torchrun, accelerate launch) rank 0 speaks for the job; the others say only errors.
_FOLLOWER = int(os.environ.get("RANK", "0") or 0) > 0
console = Console(quiet=_FOLLOWER)
err_console = Console(stderr=True)


def one_of(option: str, value: str, allowed: tuple[str, ...]) -> None:
    """A `UserError` naming the allowed values unless `value` is one of them."""
    if value not in allowed:
        listed = ", ".join(allowed[:-1]) + f" or {allowed[-1]}"
        raise UserError(f"{option} must be {listed}, not {value!r}.")


def _report(message: str, code: int) -> typer.Exit:
    err_console.print(f"Error: {message}", markup=False, highlight=False, soft_wrap=True)
    return typer.Exit(code)


def friendly(command: Callable) -> Callable:
    """Run a command so that user mistakes end as one sentence on stderr and exit code 2."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except UserError as err:
            raise _report(err.message, err.exit_code) from None
        except KeyboardInterrupt as interrupt:  # not an error: no "Error:" label
            kept = getattr(interrupt, "kept", "")  # errors.Interrupted says what it kept
            message = ("Interrupted before any work was finished." if kept is None else
                       f"Interrupted: {kept}; the same command resumes." if kept else
                       "Interrupted; finished work is kept, run the same command again to resume.")
            err_console.print(message, markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(130) from None
        except OSError as err:  # one the library did not name (the cache and outputs say what they were doing)
            if os_reason(err) is None:  # not the disk, permissions or a path: a bug, with its traceback
                raise
            action = "write" if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS) else "use"
            raise _report(os_error_message(err, action, err.filename or "a file"), 2) from None
        finally:
            release_outputs()  # the outputs this command claimed (files.claim_outputs)

    return run


class _App(typer.Typer):
    """Every command registered on the app, by any module, reports user mistakes the same way."""

    def command(self, *args, **kwargs):
        register = super().command(*args, **kwargs)
        return lambda function: register(friendly(function))


app = _App(
    help="Edit faces in real videos with a diffusion model (DiffFERV).",
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    add_completion=False,
)


# Commands that load no model: they must not pay for importing torch/diffusers (seconds of CPU).
LIGHT_COMMANDS = frozenset({"presets", "probe", "doctor"})


@app.callback()
def _quiet_libraries(ctx: typer.Context) -> None:
    """diffusers/transformers chatter (weight-loading bars, dtype notes) would bury our own output."""
    import logging
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if ctx.invoked_subcommand in LIGHT_COMMANDS:
        return
    for name in ("diffusers", "transformers", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
        diffusers_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - diffusers is a dependency
        pass


# Shared options -----------------------------------------------------------------------------------
ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Hub id, local diffusers folder, single .safetensors/.ckpt file (SD 1.x/2.x), or tiny-random / tiny-random-sdxl (random weights).")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps.")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="auto (fp16 on GPU, fp32 on CPU), fp32, fp16, bf16.")]
def _prediction_type(value: str | None) -> str | None:
    from diffferv_cli.models.families import PREDICTION_TYPES

    if value is not None and value not in PREDICTION_TYPES:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(PREDICTION_TYPES)}.")
    return value


PredictionOpt = Annotated[str | None, typer.Option(
    "--prediction-type", callback=_prediction_type, metavar="epsilon|v_prediction|sample",
    help="What the model predicts, when its own config is wrong (default: the model's scheduler config; for a "
    "single SD 2.x file, v_prediction unless the file says otherwise).", show_default=False)]
ClipSkipOpt = Annotated[int | None, typer.Option(
    "--clip-skip", min=1, metavar="N", help="Read the text encoder N layers before its last (as diffusers' clip_skip).",
    show_default=False)]
CacheOpt = Annotated[Path | None, typer.Option("--cache-dir", envvar="DIFFFERV_CACHE", help="Cache folder.")]
LoraOpt = Annotated[list[str] | None, typer.Option(
    "--lora", metavar="FILE[:SCALE]", help="A LoRA .safetensors file (diffusers/peft or kohya/Civitai layout, or a "
    "`diffferv train --lora-rank` folder), fused into the model at SCALE (default 1.0); repeat for several. It is "
    "part of the model, so of the cache key.", show_default=False)]
PresetDirOpt = Annotated[list[Path] | None, typer.Option(
    "--preset-dir", metavar="DIR", help="Folder of preset .toml files, searched before the built-in presets; repeat for several "
    f"(default: $DIFFFERV_PRESETS, folders separated by {os.pathsep!r}).", show_default=False)]


def lora_options(values: list[str] | None) -> list[tuple[Path, float]]:
    """`--lora FILE[:SCALE]` values as (file, scale), each file checked (exists, is a LoRA) before any work."""
    from diffferv_cli.models.lora import lora_file, parse_lora

    loras = [parse_lora(value) for value in values or ()]
    return [(lora_file(path), scale) for path, scale in loras]


@app.command()
def doctor(cache_dir: CacheOpt = None) -> None:
    """Check ffmpeg, torch and the device, the default model's cache, the inversion cache, and optional packages."""
    from diffferv_cli.cli.doctor import run_checks

    table = Table("check", "status", "detail")
    for check in run_checks(cache_dir):
        table.add_row(check.name, "ok" if check.ok else ("missing" if check.optional else "FAIL"), check.detail)
    console.print(table)


# Help shows plain metavars (TEXT, N, X, PATH, NAME) instead of Typer's type labels (`<list[str]>`).
_METAVARS = {"<str>": "TEXT", "<int>": "N", "<float>": "X", "<path>": "PATH", "<file>": "FILE",
             "<directory>": "DIR", "<list[str]>": "NAME", "<list[path]>": "PATH"}


def _plain_metavar(display_type):
    def display(self, ctx):
        label = display_type(self, ctx)
        return _METAVARS.get(label, label.strip("<>").upper() if label.startswith("<") else label)
    return display


def _plain_metavars() -> None:
    from typer.core import _TyperParameter

    if not getattr(_TyperParameter.display_type, "_plain", False):
        _TyperParameter.display_type = _plain_metavar(_TyperParameter.display_type)
        _TyperParameter.display_type._plain = True


_plain_metavars()


def _register_optional_groups() -> None:
    """Commands whose modules may be absent in a trimmed install."""
    import importlib

    for module_name in ("diffferv_cli.cli.video", "diffferv_cli.cli.edit", "diffferv_cli.cli.train",
                        "diffferv_cli.cli.evaluate", "diffferv_cli.cli.cache", "diffferv_cli.cli.batch"):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise
            continue
        module.register(app)


_register_optional_groups()


def _terminate(signum, frame) -> None:
    """SIGTERM (kill, a scheduler's stop) as Ctrl-C: files being written are removed, finished work kept."""
    raise KeyboardInterrupt


def main() -> None:
    import signal

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    try:
        app()
    except UserError as err:  # raised outside a command (e.g. while building the app)
        err_console.print(f"Error: {err.message}", highlight=False)
        sys.exit(2)
