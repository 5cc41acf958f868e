"""What the first hour tells the user: the whole command's work before it starts, progress lines when
stderr is no terminal, bars that name each edit and path, an ETA for the whole command, and every check
that needs no model and no frames made before either is loaded."""

from __future__ import annotations

import io
import re

import pytest
import torch
from media import make_test_clip
from rich.console import Console
from rich.progress import Progress
from typer.testing import CliRunner

from diffferv_cli.cli import app
from diffferv_cli.cli.progress import WorkTracker, _Bars, _Left, _Lines
from diffferv_cli.config import EditConfig, InversionConfig
from diffferv_cli.editing.job import job_plan

TINY = ["--model", "tiny-random", "--size", "64", "--steps", "2", "--frames", "4", "--flow-preset", "ultrafast",
        "--device", "cpu"]
STAMP = r"\d\d:\d\d:\d\d "


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    return make_test_clip(tmp_path_factory.mktemp("clip") / "clip.mp4", width=96, height=64, frames=6)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if re.match(STAMP, line)]


def test_a_piped_edit_of_several_presets_prints_the_plan_and_named_progress_lines(clip_path, tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFFERV_PROGRESS_EVERY", "0")
    out = tmp_path / "new" / "folder"  # -o names a folder that does not exist yet: made
    result = CliRunner().invoke(app, ["edit", str(clip_path), "-p", "age", "-p", "blond", *TINY, "-o", str(out),
                                      "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    assert (out / "clip.age.mp4").is_file() and (out / "clip.blond.mp4").is_file()
    lines = _lines(result.output)
    assert lines[0].endswith("Work: invert (or reuse the cache) + 2 edits (age, blond) sampled together of 4 frames "
                             "at 96x64: 2 steps × 1 window each = 4 window passes")
    said = "\n".join(lines)
    for stage in ("decode: 4/4, done in", "flow: 3/3, done in", "encode: 4/4, done in",
                  "invert: 2 steps × 1 window: 8/8, done in",
                  "edit age + blond: 2 steps × 1 window: 8/8, done in",  # one loop, one source branch
                  "decode: edit age (1 of 2): 4/4, done in", "write: edit age (1 of 2): 4/4, done in",
                  "decode: edit blond (2 of 2): 4/4, done in", "write: edit blond (2 of 2): 4/4"):
        assert stage in said, stage
    # from the first UNet pass on, the whole command's share done and time left
    first_pass = next(line for line in lines if "invert: 2 steps × 1 window: 4/8" in line)
    assert re.search(r"frames/s, \d:\d\d:\d\d left; whole command \d+%, \d:\d\d:\d\d left$", first_pass)


def test_progress_lines_come_at_a_steady_pace_and_at_each_stage_end():
    clock = Clock()
    sink = io.StringIO()
    lines = _Lines(Console(file=sink, width=200), None, every=30, clock=clock)
    for second in range(101):  # a report every second, 100 frames of 100
        clock.now = float(second)
        lines("decode", second, 100)
    said = sink.getvalue().splitlines()
    assert [line.split(" ", 1)[1] for line in said] == [
        "decode: 30/100 (30%), 1.00 frames/s, 0:01:10 left",
        "decode: 60/100 (60%), 1.00 frames/s, 0:00:40 left",
        "decode: 90/100 (90%), 1.00 frames/s, 0:00:10 left",
        "decode: 100/100, done in 0:01:40"]


def test_edits_sampled_together_are_one_loop_of_their_shared_branches():
    inversion = InversionConfig(steps=10, window_frames=8)
    edits = [(name, EditConfig(prompt_edit=f"a photo of a {name} person")) for name in ("old", "young", "blond")]
    plan = job_plan(20, (512, 768), inversion, edits)
    assert [(run.name, run.branches) for run in plan.runs] == [("invert", 1), ("edit old + young + blond", 7)]
    assert plan.describe() == ("invert (or reuse the cache) + 3 edits (old, young, blond) sampled together of 20 "
                               "frames at 512x768: 10 steps × 4 windows each = 80 window passes")
    plan = job_plan(20, (512, 768), inversion, edits, max_batch_rows=5 * 8)  # two edits' branches per call
    assert [(run.name, run.branches) for run in plan.runs] == [
        ("invert", 1), ("edit old + young (1-2 of 3)", 5), ("edit blond (3 of 3)", 3)]
    assert plan.describe().startswith("invert (or reuse the cache) + 3 edits (old, young, blond) in 2 shared loops")


def test_the_whole_command_eta_counts_every_edit_and_drops_a_cached_inversion():
    inversion = InversionConfig(steps=10, window_frames=8)
    edits = [(name, EditConfig(prompt_edit=f"a photo of a {name} person")) for name in ("old", "young")]
    plan = job_plan(20, (512, 768), inversion, edits, max_batch_rows=3 * 8)  # one edit per loop
    assert [run.name for run in plan.runs] == ["invert", "edit old (1 of 2)", "edit young (2 of 2)"]
    assert plan.describe() == ("invert (or reuse the cache) + 2 edits (old, young) of 20 frames at 512x768: "
                               "10 steps × 4 windows each = 120 window passes")
    passes = plan.runs[0].frames_per_pass  # 4 windows of 8 frames
    assert passes == 32 and [run.branches for run in plan.runs] == [1, 3, 3]
    clock = Clock()
    work = WorkTracker(clock)
    work.plan = plan
    assert work.total == 10 * 32 * (1 + 3 + 3)
    work.update("edit old (1 of 2): 10 steps × 4 windows", 0, 320)  # no inversion report: it was cached
    clock.now = 60.0
    work.update("edit old (1 of 2): 10 steps × 4 windows", 32, 320)  # its first step
    assert (work.done, work.total) == (96, 1920)  # in frame rows: 3 branches
    assert work.left() == pytest.approx(60.0 * 19)  # 19 of the 20 steps of both edits left
    assert not work.update("decode: edit old (1 of 2)", 4, 20)  # not a UNet loop


def test_a_bar_shows_its_time_left_after_one_slow_update():
    """Rich's own estimate looks at the last 30 s only: one window pass of two minutes left it blank."""
    clock = Clock()
    bars = Progress(_Left(), console=Console(file=io.StringIO(), force_terminal=True), get_time=clock)
    task = bars.add_task("invert", total=10)
    clock.now = 120.0
    bars.update(task, completed=1)
    assert _Left().render(bars.tasks[task]).plain == "0:18:00 left"


def test_the_bars_carry_a_whole_command_bar_from_the_plan():
    clock = Clock()
    inversion = InversionConfig(steps=2)
    console = Console(file=io.StringIO(), force_terminal=True, width=200)
    with Progress(console=console, get_time=clock) as progress:
        bars = _Bars(progress, lambda frames, size: job_plan(frames, size, inversion))
        bars.clip_known(4, (96, 64))
        bars("invert: 2 steps × 1 window", 0, 8)
        clock.now = 10.0
        bars("invert: 2 steps × 1 window", 4, 8)
        overall = progress.tasks[bars.overall]
        assert (overall.completed, overall.total, overall.elapsed) == (4, 8, 10.0)
    assert "Work: invert of 4 frames at 96x64: 2 steps × 1 window = 2 window passes" in console.file.getvalue()


def test_reconstruct_compare_names_each_path_and_reports_every_path_at_source_resolution(clip_path, tmp_path,
                                                                                         monkeypatch):
    monkeypatch.setenv("DIFFFERV_PROGRESS_EVERY", "0")
    result = CliRunner().invoke(app, ["reconstruct", str(clip_path), "--compare", *TINY, "-o",
                                      str(tmp_path / "rec.mp4"), "--cache-dir", str(tmp_path / "cache")],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for name in ("reconstruct injected (paper) (1 of 3)", "reconstruct exact (2 of 3)",
                 "reconstruct plain DDIM (3 of 3)"):
        assert f"{name}: 2 steps × 1 window: 8/8, done in" in result.output, name
    table = result.output.split("At source resolution (96x64)")[1]
    rows = {tuple(cell.strip() for cell in row.split("│")[1:3]) for row in table.splitlines() if "│" in row}
    assert {(path, mode) for path in ("injected (paper)", "exact", "plain DDIM")
            for mode in ("replace", "residual")} <= rows
    exact = next(row for row in table.splitlines() if "exact" in row and "residual" in row)
    assert "100.00" in exact  # the exact path composited is the source itself


@pytest.fixture
def no_work(monkeypatch):
    """Decoding or loading a model fails the test."""
    import diffferv_cli.models.loading as loading
    import diffferv_cli.video.io as video_io

    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the checks")

    monkeypatch.setattr(loading, "load_components", forbidden)
    monkeypatch.setattr(video_io, "read_clip", forbidden)


@pytest.mark.parametrize("command", ["invert", "edit", "reconstruct"])
def test_a_missing_cuda_is_reported_before_decoding_or_loading(clip_path, tmp_path, no_work, command, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    extra = ["-p", "age"] if command == "edit" else []
    args = [command, str(clip_path), *extra, *TINY[:-2], "--device", "cuda", "--cache-dir", str(tmp_path / "c")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "CUDA is not available" in result.output


@pytest.mark.parametrize("command", ["edit", "reconstruct"])
@pytest.mark.parametrize("case", ["unwritable", "exists", "input"])
def test_a_bad_output_is_reported_before_decoding_or_loading(clip_path, tmp_path, no_work, command, case):
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"")
    out = {"unwritable": blocker / "out", "exists": blocker.with_suffix(".mp4"), "input": clip_path}[case]
    if case == "exists":
        out.write_bytes(b"an earlier edit")
    extra = ["-p", "age"] if command == "edit" else []
    result = CliRunner().invoke(app, [command, str(clip_path), *extra, *TINY, "-o", str(out), "--cache-dir",
                                      str(tmp_path / "c")])
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert {"unwritable": "Cannot create the output folder", "exists": "already exists",
            "input": "is the input video"}[case] in message
    assert not (tmp_path / "c").exists()
