"""`diffferv presets` and `diffferv probe` through Typer's CliRunner, bad inputs included."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from media import audio_only, empty_file, make_test_clip, text_as_video
from typer.testing import CliRunner

from diffferv_cli.cli import app

REPO = Path(__file__).resolve().parents[1]


def invoke(*args: str):
    return CliRunner().invoke(app, [str(arg) for arg in args])


def assert_user_error(result, message: str) -> None:
    """Exit code 2, one line `Error: <sentence>` on stderr, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert message in lines[0]
    assert "Traceback" not in result.output + result.stderr


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    return tmp_path_factory.mktemp("cli-media")


def test_presets_lists_the_builtins():
    result = invoke("presets")
    assert result.exit_code == 0, result.output
    for name in ("age", "young", "man", "woman", "smiling", "blond", "bangs", "lipstick", "glasses"):
        assert name in result.stdout
    assert "0.9" in result.stdout and "0.7" in result.stdout


def test_presets_with_an_extra_folder(tmp_path):
    (tmp_path / "pirate.toml").write_text('description = "Arr."\nedit_prompt = "a photo of a {subject} pirate"\n')
    result = invoke("presets", "--dir", tmp_path)
    assert result.exit_code == 0 and "pirate" in result.stdout


def test_presets_with_a_malformed_file(tmp_path):
    """The bad file is named with its reason, the good presets are still listed, and the exit code is 2."""
    (tmp_path / "broken.toml").write_text("description = \n")
    result = invoke("presets", "--dir", tmp_path)
    assert result.exit_code == 2 and "Traceback" not in result.output + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[0].startswith("Skipped ") and "broken.toml" in lines[0] and "not valid TOML" in lines[0]
    assert lines[-1].startswith("Error: 1 preset file could not be read")
    assert "age" in result.stdout  # the built-in presets are listed all the same


@pytest.mark.parametrize("kind, options, expected", [
    (dict(width=96, height=64, frames=8), ["--size", "64", "--multiple", "16", "--stride", "2"],
     ["96x64", "24/1", "4 frames: 0, 2, 4, 6", "96x64 (scaled to 96x64, none)"]),
    (dict(width=96, height=64, frames=3, rotation=90), [], ["64x96 (stored rotated 90°)", "512x768"]),
    (dict(width=64, height=112, frames=2), ["--size", "64", "--multiple", "64"], ["64x112", "64x128", "pad"]),
    (dict(width=641, height=359, frames=1), [], ["641x359", "1 frames: 0", "960x512 (scaled to 914x512, pad"]),
    (dict(width=96, height=64, frames=12, vfr=True), [], ["variable", "12 frames"]),
    (dict(width=4096, height=2160, frames=2, pattern="color=c=gray"), ["--size", "64", "--multiple", "16"],
     ["4096x2160", "128x64 (scaled to 121x64"]),
])
def test_probe_shows_info_and_selection(media, kind, options, expected):
    name = "_".join(f"{key}{value}" for key, value in kind.items()).replace("=", "-") + ".mp4"
    path = make_test_clip(media / name, **kind)
    result = invoke("probe", path, *options)
    assert result.exit_code == 0, result.output
    for text in expected:
        assert text in result.stdout


@pytest.mark.parametrize("make, options, message", [
    (lambda folder: folder / "missing.mp4", [], "missing.mp4 does not exist."),
    (lambda folder: folder, [], "is a folder, not a video file."),
    (lambda folder: empty_file(folder / "empty.mp4"), [], "empty.mp4 is empty"),
    (lambda folder: text_as_video(folder / "notes.mp4"), [], "notes.mp4 is not a video ffmpeg can read"),
    (lambda folder: audio_only(folder / "song.mp4"), [], "song.mp4 has no video stream."),
    (lambda folder: make_test_clip(folder / "short.mp4", frames=2), ["--start", "5"], "--start 5 is past the end"),
    (lambda folder: make_test_clip(folder / "ok.mp4", frames=2), ["--size", "100"], "--size"),
    (lambda folder: make_test_clip(folder / "ok2.mp4", frames=2), ["--stride", "0"], "--stride"),
])
def test_probe_bad_input_is_one_line_exit_2(tmp_path, make, options, message):
    path = make(tmp_path)
    before = sorted(tmp_path.iterdir())
    assert_user_error(invoke("probe", path, *options), message)
    assert sorted(tmp_path.iterdir()) == before


# What the light commands import ----------------------------------------------------------------------

HEAVY = ("torch", "diffusers", "transformers")


def imported_modules(*args: str) -> set[str]:
    """Every module `python -X importtime -m diffferv_cli ARGS` imports (run in a fresh interpreter)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "diffferv_cli", *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return {line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}


@pytest.mark.parametrize("args, allowed", [
    (["--help"], ()),
    (["presets"], ()),
    (["probe", "{clip}"], ()),
    (["doctor"], ("torch",)),  # it reports torch's version and the device; nothing else heavy
])
def test_light_commands_do_not_import_the_diffusion_stack(media, args, allowed):
    clip = make_test_clip(media / "light.mp4", frames=2)
    modules = imported_modules(*(arg.format(clip=clip) for arg in args))
    assert "diffferv_cli.cli" in modules  # the parse really saw our imports
    assert not {name for name in HEAVY if name not in allowed} & modules


def _find(tree, key: str):
    """The first value stored under `key` anywhere in a JSON tree."""
    if isinstance(tree, dict):
        if key in tree:
            return tree[key]
        tree = list(tree.values())
    if isinstance(tree, list):
        return next((found for item in tree if (found := _find(item, key)) is not None), None)
    return None


def test_probe_and_invert_agree_on_the_working_size(media, tmp_path):
    """probe shows the working size invert then uses, for the model given: 1920x1080 at --size 512 is
    910x512 scaled, 960x512 for SD1.5 (/64) and 912x512 for tiny-random (/16)."""
    hd = make_test_clip(media / "hd.mp4", width=1920, height=1080, frames=1, pattern="color=c=gray")
    assert "960x512 (scaled to 910x512" in invoke("probe", hd).stdout
    assert "912x512 (scaled to 910x512" in invoke("probe", hd, "--model", "tiny-random").stdout
    # the same check through a real inversion, small: 1440x1080 at --size 64 is 85x64 scaled, 96x64 at /16
    path = make_test_clip(media / "4x3.mp4", width=1440, height=1080, frames=1, pattern="color=c=gray")
    assert "128x64 (scaled to 85x64" in invoke("probe", path, "--size", "64").stdout
    assert "96x64 (scaled to 85x64" in invoke("probe", path, "--size", "64", "--model", "tiny-random").stdout
    result = invoke("invert", path, "--model", "tiny-random", "--size", "64", "--steps", "1",
                    "--flow-preset", "ultrafast", "--cache-dir", tmp_path / "cache", "--device", "cpu")
    assert result.exit_code == 0, result.output
    manifest = json.loads(next((tmp_path / "cache").rglob("manifest.json")).read_text())
    assert _find(manifest, "working_size") == [96, 64]
