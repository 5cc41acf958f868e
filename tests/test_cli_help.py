"""`--help` reads as a manual: plain metavars (TEXT, N, X, PATH, NAME) instead of type labels, an example
line on every command that does work, and option help that holds for every model family."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from diffferv_cli.cli import app

COMMANDS = ["invert", "edit", "reconstruct", "presets", "probe", "train", "caption", "eval", "batch", "cache"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_has_plain_metavars(command):
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert not re.search(r"<(str|int|float|path|list\[[a-z]+\])>", result.output), result.output


@pytest.mark.parametrize("command", ["invert", "edit", "reconstruct", "presets", "probe", "train", "eval"])
def test_help_ends_with_examples(command):
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert f"diffferv {command} " in result.output.split("Example")[-1]


def test_size_help_is_true_for_every_family():
    result = CliRunner().invoke(app, ["edit", "--help"], env={"COLUMNS": "200"})
    text = " ".join(result.output.split())
    assert "multiple of 64" not in text
    assert "512 for SD 1.x, 768 for SD 2.x 768-v, 1024 for SDXL" in text
