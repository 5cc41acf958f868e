"""`diffferv batch`: the jobs file (three formats, every row checked before any work, outputs checked),
the plan (one inversion per clip, longest first), and end to end on a local 2-CPU Ray instance with the
tiny model: outputs equal to plain `diffferv edit` runs, a bad clip failing alone, a killed worker's job
run again from the cache."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from media import decode_all, make_test_clip
from typer.testing import CliRunner

from diffferv_cli.cli import app
from diffferv_cli.cli.edit import edit_request
from diffferv_cli.errors import UserError
from diffferv_cli.scale import cluster
from diffferv_cli.scale.jobs import load_jobs, option_fields

SMALL = {"model": "tiny-random", "steps": 2, "size": 64, "frames": 3, "flow_preset": "ultrafast", "lossless": True,
         "device": "cpu"}
SMALL_ARGS = ["--model", "tiny-random", "--steps", "2", "--size", "64", "--frames", "3", "--flow-preset", "ultrafast",
              "--lossless", "--device", "cpu"]


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("clips")
    return {"a": make_test_clip(folder / "a.mp4", width=96, height=64, frames=5),
            "b": make_test_clip(folder / "b.mp4", width=64, height=96, frames=5, pattern="testsrc"),
            "bad": (folder / "bad.mp4").write_text("not a video") and folder / "bad.mp4"}


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row, default=str) + "\n" for row in rows))
    return path


def _targets(request):
    from diffferv_cli.cli.batch import _targets

    return _targets(request)


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if the batch gets as far as planning or Ray."""

    def refuse(*args, **kwargs):
        raise AssertionError("work started before every job was checked")

    for name in ("plan_jobs", "start_ray", "run_batch"):
        monkeypatch.setattr(cluster, name, refuse)


def _batch(*args: str):
    return CliRunner().invoke(app, ["batch", *map(str, args)])


# -- the jobs file -----------------------------------------------------------------------------------
def test_the_three_formats_give_the_same_jobs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _jsonl(tmp_path / "jobs.jsonl", [
        {"clip": "a.mp4", "presets": ["age", "blond"], "out": "out", "steps": 3, "tau_app": 0.5, "lossless": True},
        {"clip": "b.mp4", "prompt_edit": "a photo of an old person", "frames": 4, "stride": 2}])
    (tmp_path / "jobs.csv").write_text(
        "clip,presets,out,steps,tau_app,lossless,prompt_edit,frames,stride\n"
        "a.mp4,age;blond,out,3,0.5,true,,,\n"
        "\n"
        "b.mp4,,,,,,a photo of an old person,4,2\n")
    (tmp_path / "jobs.toml").write_text(
        '[[job]]\nclip = "a.mp4"\npresets = ["age", "blond"]\nout = "out"\nsteps = 3\ntau_app = 0.5\nlossless = true\n\n'
        '[[job]]\nclip = "b.mp4"\nprompt_edit = "a photo of an old person"\nframes = 4\nstride = 2\n')
    loaded = {kind: load_jobs(tmp_path / f"jobs.{kind}", edit_request, targets=_targets)
              for kind in ("jsonl", "csv", "toml")}
    first, second = loaded["jsonl"]
    assert first.options["preset"] == ["age", "blond"] and first.options["steps"] == 3
    assert first.options["out"] == Path("out") and first.options["lossless"] is True
    assert [label for label, _ in first.request.edits] == ["age", "blond"]
    assert {config.tau_app for _, config in first.request.edits} == {0.5}
    assert first.request.inversion.steps == 3
    assert first.targets == (Path("out/a.age.mp4"), Path("out/a.blond.mp4"))
    assert second.request.spec.frames == 4 and second.request.spec.stride == 2
    assert second.options["steps"] == option_fields(edit_request)["steps"].default  # edit's own default
    assert second.targets == (Path("b.edit.mp4"),)
    assert [job.where for job in loaded["csv"]] == ["line 2", "line 4"]
    assert [job.where for job in loaded["toml"]] == ["job 1", "job 2"]
    for kind in ("csv", "toml"):
        assert [job.options for job in loaded[kind]] == [job.options for job in loaded["jsonl"]], kind
        assert [job.request for job in loaded[kind]] == [job.request for job in loaded["jsonl"]], kind


@pytest.mark.parametrize("row, named", [
    ({"clip": "a.mp4", "presets": ["age"], "stepz": 3}, "unknown field 'stepz' (did you mean 'steps'?)"),
    ({"clip": "a.mp4", "presets": ["age"], "steps": "many"}, "field 'steps': must be a whole number, not 'many'"),
    ({"clip": "a.mp4", "presets": ["age"], "steps": 2.5}, "field 'steps': must be a whole number"),
    ({"clip": "a.mp4", "presets": ["age"], "lossless": "maybe"}, "field 'lossless': must be true or false"),
    ({"clip": "a.mp4", "presets": "age", "clip_skip": 0}, "field 'clip_skip': must be at least 1"),
    ({"clip": "a.mp4", "presets": ["age"], "prediction_type": "noise"}, "field 'prediction_type': 'noise' is not one"),
    ({"clip": "a.mp4", "presets": ["age"], "size": 100}, "Invalid 'size'"),
    ({"clip": "a.mp4", "presets": ["age"], "features": "ram"}, "'features' must be"),
    ({"clip": "a.mp4", "presets": ["age"], "tau_app": 2}, "tau_app"),
    ({"clip": "a.mp4", "presets": ["no-such-preset"]}, "no-such-preset"),
    ({"clip": "a.mp4"}, "'presets' NAME"),
    ({"presets": ["age"], "out": "out"}, "no 'clip' field; every job needs one"),
    ({"clip": "a.mp4", "presets": ["age", "blond"], "out": "x.mp4"}, "Several edits need 'out' to be a folder"),
    ({"clip": "a.mp4", "presets": ["age"], "device": "tpu"}, "Unknown device 'tpu'"),
    ({"clip": "a.mp4", "presets": ["age"], "model": "no/such/model"}, "no/such/model"),
])
def test_a_bad_row_is_named_before_any_work(tmp_path, monkeypatch, no_work, row, named):
    monkeypatch.chdir(tmp_path)
    jobs = _jsonl(tmp_path / "jobs.jsonl", [{"clip": "a.mp4", "presets": ["age"], **SMALL}, row, {"nonsense": 1}])
    result = _batch(jobs)
    assert result.exit_code == 2, result.output
    assert result.output.startswith("Error: jobs.jsonl line 2: ") and named in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text, named", [
    ("clip,presets,steps\na.mp4,age,2\nb.mp4,age,two\n", "jobs.csv line 3: field 'steps': must be a whole number"),
    ("clip,presets\na.mp4,age,extra\n", "jobs.csv line 2 has 3 cells"),
])
def test_a_bad_csv_row_is_named_by_its_line(tmp_path, monkeypatch, no_work, text, named):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "jobs.csv").write_text(text)
    result = _batch(tmp_path / "jobs.csv")
    assert result.exit_code == 2 and named in result.output, result.output


def test_a_bad_toml_job_and_a_bad_file_are_named(tmp_path, monkeypatch, no_work):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "jobs.toml").write_text('[[job]]\nclip = "a.mp4"\npresets = ["age"]\n[[job]]\nclip = 3\n')
    result = _batch(tmp_path / "jobs.toml")
    assert result.exit_code == 2 and "jobs.toml job 2: field 'clip': must be text" in result.output, result.output
    (tmp_path / "jobs.txt").write_text("{}")
    result = _batch(tmp_path / "jobs.txt")
    assert result.exit_code == 2 and ".jsonl, .csv or .toml" in result.output
    (tmp_path / "empty.jsonl").write_text("\n")
    result = _batch(tmp_path / "empty.jsonl")
    assert result.exit_code == 2 and "holds no job" in result.output


def test_output_collisions_are_refused_before_any_work(tmp_path, monkeypatch, no_work):
    monkeypatch.chdir(tmp_path)
    age = {"clip": "a.mp4", "presets": ["age"], "out": "out", **SMALL}
    result = _batch(_jsonl(tmp_path / "same.jsonl", [age, {**age, "steps": 3}]))
    assert result.exit_code == 2 and "line 2 and line 1 both write out/a.age.mp4" in result.output, result.output
    result = _batch(_jsonl(tmp_path / "input.jsonl", [age, {**age, "clip": "b.mp4", "out": "a.mp4"}]))
    assert result.exit_code == 2 and "line 2: the output a.mp4 is the input video of line 1" in result.output
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a.age.mp4").write_bytes(b"earlier")
    late = [{"clip": "b.mp4", "presets": ["age"], "out": "out", **SMALL}, age]
    result = _batch(_jsonl(tmp_path / "exists.jsonl", late))
    assert result.exit_code == 2 and "line 2: out/a.age.mp4 already exists" in result.output, result.output
    result = _batch(_jsonl(tmp_path / "side.jsonl", [{**age, "presets": ["blond"], "side_by_side": True},
                                                    {**age, "out": "out/a.blond.side-by-side.mp4"}]))
    assert result.exit_code == 2 and "both write out/a.blond.side-by-side.mp4" in result.output, result.output
    with pytest.raises(AssertionError, match="work started"):  # --overwrite: past the checks, into the work
        CliRunner().invoke(app, ["batch", str(tmp_path / "exists.jsonl"), "--overwrite"], catch_exceptions=False)


def test_the_plan_inverts_each_clip_once_longest_first(tmp_path, monkeypatch, clips):
    monkeypatch.chdir(clips["a"].parent)
    jobs = load_jobs(_jsonl(tmp_path / "jobs.jsonl", [
        {"clip": "a.mp4", "presets": ["age"], **SMALL},
        {"clip": "b.mp4", "presets": ["age", "blond", "glasses"], **SMALL},
        {"clip": "a.mp4", "presets": ["blond"], **SMALL},
        {"clip": "a.mp4", "presets": ["glasses"], **{**SMALL, "steps": 3}},  # another inversion
        {"clip": "bad.mp4", "presets": ["age"], **SMALL}]), edit_request, targets=_targets)
    groups, failed, weights = cluster.plan_jobs(jobs)
    assert [[job.number for job in group.jobs] for group in groups] == [[2], [1, 3], [4]]
    assert [result.number for result in failed] == [5] and "bad.mp4" in failed[0].error
    assert weights[1] > weights[3] > 0  # the first job of a group also inverts
    assert [group.weight for group in groups] == sorted((group.weight for group in groups), reverse=True)


# -- on Ray -------------------------------------------------------------------------------------------
def test_a_worker_loads_its_model_once_and_decodes_each_clip_it_runs(tmp_path, monkeypatch, clips):
    """The worker without Ray: two jobs on two clips, one model load, each output that of its own clip."""
    import diffferv_cli.models.loading as loading
    from diffferv_cli.editing.cache import cache_root

    loads = []
    real_load = loading.load_components
    monkeypatch.setattr(loading, "load_components", lambda *args, **kwargs: loads.append(args) or real_load(*args, **kwargs))
    monkeypatch.chdir(clips["a"].parent)
    out = tmp_path / "out"
    jobs = load_jobs(_jsonl(tmp_path / "jobs.jsonl", [{"clip": name, "presets": [preset], "out": str(out), **SMALL}
                                                      for name, preset in (("a.mp4", "age"), ("b.mp4", "age"),
                                                                           ("a.mp4", "blond"))]),
                     edit_request, targets=_targets)
    worker = cluster.BatchWorker()
    results = [worker.run(cluster.Task(job.number, job.request, cache_root(None), inverts=True)) for job in jobs[:2]]
    assert all(result.ok for result in results), [result.error for result in results]
    assert len(loads) == 1 and len(worker.models) == 1
    assert [result.inversion_steps for result in results] == [2, 2]
    again = worker.run(cluster.Task(3, jobs[2].request, cache_root(None), inverts=False))
    assert again.ok and again.inversion_steps == 0 and len(loads) == 1  # the cached inversion, the warm model
    b_frames = decode_all(out / "b.age.mp4")
    assert np.array_equal(b_frames, _edited(tmp_path, clips["b"], "age", "plain-b.mp4", threads=torch_threads()))


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _edited(tmp_path, clip: Path, preset: str, name: str, *args: str, threads: int = 1) -> np.ndarray:
    """The same job through plain `diffferv edit`, with its own cache (so it inverts for itself), on as many
    torch threads as the batch's worker had (each of 2 workers on 2 CPUs has 1; another count of threads
    rounds a few values differently)."""
    import torch

    out, threads_before = tmp_path / name, torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        result = CliRunner().invoke(app, ["edit", str(clip), "-p", preset, *SMALL_ARGS, *args, "-o", str(out),
                                          "--cache-dir", str(tmp_path / f"{name}-cache")])
    finally:
        torch.set_num_threads(threads_before)
    assert result.exit_code == 0, result.output
    return decode_all(out)


def _entries(cache: Path) -> list[Path]:
    return sorted(path for path in cache.iterdir() if path.is_dir() and not path.name.startswith("."))


def test_batch_end_to_end_on_a_local_instance(tmp_path, monkeypatch, clips):
    monkeypatch.chdir(clips["a"].parent)
    cache = tmp_path / "cache"
    rows = [{"clip": name, "presets": [preset], "out": str(tmp_path / "out"), "cache_dir": str(cache), **SMALL}
            for name in ("a.mp4", "b.mp4") for preset in ("age", "blond")]
    rows.insert(2, {"clip": "bad.mp4", "presets": ["age"], "out": str(tmp_path / "out"), **SMALL})
    report = tmp_path / "report.json"
    started = time.monotonic()
    result = _batch(_jsonl(tmp_path / "jobs.jsonl", rows), "--workers", "2", "--report", report)
    seconds = time.monotonic() - started
    assert result.exit_code == 2, result.output
    assert "1 of 5 jobs failed (line 3)" in result.output
    outputs = {name: tmp_path / "out" / name for name in ("a.age.mp4", "a.blond.mp4", "b.age.mp4", "b.blond.mp4")}
    assert all(path.is_file() for path in outputs.values()), result.output
    data = json.loads(report.read_text())
    assert (data["jobs"], data["failed"], data["workers"], data["inversions"]) == (5, 1, 2, 2)
    by_line = {entry["where"]: entry for entry in data["results"]}
    assert not by_line["line 3"]["ok"] and "bad.mp4 is not a video" in by_line["line 3"]["error"]
    assert by_line["line 1"]["outputs"] == [str(outputs["a.age.mp4"])]
    inverted = sorted(entry["where"] for entry in data["results"] if entry["inversion_steps"])
    assert inverted == ["line 1", "line 4"]  # the first job of each clip; the second edits from its inversion
    assert len(_entries(cache)) == 2  # one cache entry per clip
    assert {by_line[where]["cache_entry"] for where in ("line 1", "line 2")} != {by_line["line 4"]["cache_entry"]}
    assert "done line 1 (a.mp4)" in result.output and "failed line 3 (bad.mp4)" in result.output
    print(f"batch of 5 jobs on 2 workers: {seconds:.1f} s")
    for name, preset in (("a", "age"), ("b", "blond")):
        assert np.array_equal(decode_all(outputs[f"{name}.{preset}.mp4"]), _edited(tmp_path, clips[name], preset,
                                                                                  f"plain-{name}.mp4")), name


def _worker_running_a_job() -> int | None:
    import psutil

    for process in psutil.process_iter(["cmdline"]):
        if any("BatchWorker.run" in part for part in process.info["cmdline"] or ()):
            return process.pid
    return None


@pytest.mark.slow  # about 70 s on 2 busy CPUs: 12 steps, run twice (batch and plain edit)
def test_a_killed_worker_has_its_job_run_again_from_the_cache(tmp_path, monkeypatch, clips):
    monkeypatch.chdir(clips["a"].parent)
    cache, steps = tmp_path / "cache", 12
    row = {"clip": "a.mp4", "presets": ["age"], "out": str(tmp_path / "out"), "cache_dir": str(cache),
           **SMALL, "steps": steps}
    killed: list[int] = []

    def kill_mid_inversion() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            manifests = list(cache.glob("*/manifest.json"))
            try:
                finished = json.loads(manifests[0].read_text())["finished_steps"] if manifests else -1
            except (OSError, ValueError):
                finished = -1
            pid = _worker_running_a_job() if 2 <= finished <= steps - 4 else None
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                killed.append(finished)
            time.sleep(0.01)

    killer = threading.Thread(target=kill_mid_inversion, daemon=True)
    killer.start()
    report = tmp_path / "report.json"
    result = _batch(_jsonl(tmp_path / "jobs.jsonl", [row]), "--report", report)
    killer.join(timeout=5)
    assert killed, "the worker was never caught mid-inversion"
    assert result.exit_code == 0, result.output
    assert "its worker died" in result.output and "running it again" in result.output
    entry = json.loads(report.read_text())["results"][0]
    assert entry["attempts"] == 2
    assert 0 < entry["inversion_steps"] < steps, entry  # resumed, not started over
    plain = _edited(tmp_path, clips["a"], "age", "plain.mp4", "--steps", str(steps), threads=2)  # 1 worker, 2 CPUs
    assert np.array_equal(decode_all(tmp_path / "out" / "a.age.mp4"), plain)


def test_no_ray_is_one_sentence(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def without_ray(name, *args, **kwargs):
        if name == "ray":
            raise ModuleNotFoundError("No module named 'ray'", name="ray")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_ray)
    with pytest.raises(UserError, match="needs Ray: pip install"):
        cluster.start_ray(None)
