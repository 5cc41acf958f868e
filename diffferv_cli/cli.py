"""Thin Typer commands: build a config, call the library, render with rich.

Command groups live beside this file (`cli_*.py`) and are registered here. Every command reports user
mistakes as one sentence on stderr with exit code 2 (see `errors.UserError`)."""

from __future__ import annotations

import sys
from typing import Annotated

import click
import typer
from rich.console import Console
from rich.table import Table

from diffferv_cli.errors import UserError

console = Console()
err_console = Console(stderr=True)


class _FriendlyError(click.ClickException):
    """A `UserError` on its way out through click: `Error: <sentence>` on stderr, exit code 2."""

    exit_code = 2


class _Group(typer.core.TyperGroup):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as err:
            raise _FriendlyError(err.message) from None
        except KeyboardInterrupt:
            interrupted = _FriendlyError(
                "Interrupted; finished work is kept, run the same command again to resume.")
            interrupted.exit_code = 130
            raise interrupted from None
        except OSError as err:
            if err.errno == 28:  # ENOSPC
                raise _FriendlyError(f"No space left on the device while writing {err.filename or 'output'}; "
                                     "free some disk or pass --cache-dir / -o on another disk.") from None
            raise


app = typer.Typer(
    cls=_Group,
    help="Edit faces in real videos with a diffusion model (DiffFERV).",
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    add_completion=False,
)


# Shared options -----------------------------------------------------------------------------------
ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Hub id, local diffusers folder, .safetensors file, or tiny-random.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps.")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="auto (fp16 on GPU, fp32 on CPU), fp32, fp16, bf16.")]


@app.command()
def doctor() -> None:
    """Check ffmpeg, torch and the device, the default model's cache, and optional packages."""
    from diffferv_cli.doctor import run_checks

    table = Table("check", "status", "detail")
    for check in run_checks():
        table.add_row(check.name, "ok" if check.ok else ("missing" if check.optional else "FAIL"), check.detail)
    console.print(table)


def _register_optional_groups() -> None:
    """Commands whose modules may be absent in a trimmed install."""
    import importlib

    for module_name in ("diffferv_cli.cli_video", "diffferv_cli.cli_edit", "diffferv_cli.cli_train",
                        "diffferv_cli.cli_eval"):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise
            continue
        module.register(app)


_register_optional_groups()


def main() -> None:
    try:
        app()
    except UserError as err:  # raised outside a command (e.g. while building the app)
        err_console.print(f"Error: {err.message}", highlight=False)
        sys.exit(2)
