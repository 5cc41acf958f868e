"""`diffferv presets` and `diffferv probe` through Typer's CliRunner, bad inputs included."""

from __future__ import annotations

import pytest
from media import audio_only, empty_file, make_test_clip, text_as_video
from typer.testing import CliRunner

from diffferv_cli.cli import app


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
    (tmp_path / "broken.toml").write_text("description = \n")
    assert_user_error(invoke("presets", "--dir", tmp_path), "broken.toml")


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
