"""The step loop keeps a device busy: no host sync and no graph break inside a UNet call, one compiled
graph for every step, the trajectory checks done once, cache I/O in background threads that keep
durability (a killed `diffferv invert` resumes to the same latents)."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from reference_attention import random_partition, trajectory_set

from diffferv_cli.editing.features import FeatureInjector, FeatureRecorder, InjectionSchedule
from diffferv_cli.editing.prefetch import WriteBehind
from diffferv_cli.editing.prompts import token_alignment
from diffferv_cli.temporal import AttentionContext, temporal_attention
from diffferv_cli.temporal.counting import CallCounter

FRAMES, LATENT = 3, (8, 12)
SOURCE, EDITED = "a photo of a person", "a photo of an old person"
BRANCHES = ("source", "negative", "positive")


def _trajectories(frames=FRAMES, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return trajectory_set(LATENT, 2, frames, lambda h, w, f: random_partition(h, w, f, generator, 0.7))


def _inputs(unet, branches: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(branches * FRAMES, 4, *LATENT, generator=generator)
    text = torch.randn(branches * FRAMES, 77, unet.config.cross_attention_dim, generator=generator)
    return latents, text


def _injector(tiny, steps=4, source_branch="source", branches=BRANCHES):
    targets = tuple(name for name in branches if name != "source")
    prompts = {"negative": SOURCE, "positive": EDITED}
    maps = {name: token_alignment(tiny.tokenizer, SOURCE, prompts[name]) for name in targets}
    schedule = InjectionSchedule(steps, tau_app=0.5, tau_motion=0.75, tau_cross=1.0)
    return FeatureInjector(schedule, branches, targets, maps, source_branch=source_branch)


def _contexts(tiny):
    """name -> (context, batch branches) for an inversion call and edit calls with injection on."""
    trajectories = _trajectories()
    inversion = AttentionContext(frames=FRAMES, branches=("source",), latent_size=LATENT, trajectories=trajectories)
    edit = AttentionContext(frames=FRAMES, branches=BRANCHES, latent_size=LATENT, trajectories=trajectories)
    # disk mode: features recorded by an inversion call, on the device before the call
    recorder = FeatureRecorder(dtype=torch.float32)
    latents, text = _inputs(tiny.unet, 1)
    with temporal_attention(tiny.unet), torch.inference_mode():
        tiny.unet(latents, 500, text, cross_attention_kwargs={"ctx": inversion.at_step(0, 500, control=recorder)})
    disk_branches = ("negative", "positive")
    disk = AttentionContext(frames=FRAMES, branches=disk_branches, latent_size=LATENT, trajectories=trajectories)
    disk_injector = _injector(tiny, source_branch=None, branches=disk_branches)
    return {
        "inversion": (inversion, 1),
        "inversion recording features": (inversion.at_step(0, 500, control=recorder), 1),
        "edit, recompute mode": (edit.at_step(0, 500, control=_injector(tiny).at_step(0)), 3),
        "edit, disk mode": (disk.at_step(0, 500, control=disk_injector.at_step(0, recorder.features)), 2),
    }


# --------------------------------------------------------------------------------------------------
# host syncs
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sync", [
    lambda x: x.sum().item(),
    lambda x: bool((x > 0).any()),
    lambda x: int(x.argmax()),
    lambda x: x[x > 0],
    lambda x: x.nonzero(),
    lambda x: torch.equal(x, x),
    lambda x: x.cpu(),
    lambda x: x.tolist(),
    lambda x: torch.bincount(x.long().abs().reshape(-1)),
])
def test_counter_sees_each_kind_of_host_sync(sync):
    x = torch.randn(4, 3)
    with CallCounter() as counter:
        sync(x)
    assert counter.syncs >= 1


def test_counter_passes_device_side_work():
    x = torch.randn(4, 3)
    with CallCounter() as counter:
        torch.where(x > 0, x, x.index_select(0, torch.tensor([3, 2, 1, 0]))).softmax(-1)
    assert counter.syncs == 0 and counter.torch_calls >= 4


@pytest.mark.parametrize("name", ["inversion", "inversion recording features", "edit, recompute mode",
                                  "edit, disk mode"])
def test_no_host_sync_in_a_temporal_unet_call(tiny, name):
    ctx, branches = _contexts(tiny)[name]
    latents, text = _inputs(tiny.unet, branches)
    timestep = torch.tensor(500)  # on the device, as the loops pass it
    with temporal_attention(tiny.unet), torch.inference_mode():
        with CallCounter() as counter:
            tiny.unet(latents, timestep, text, cross_attention_kwargs={"ctx": ctx})
    assert counter.syncs == 0, dict(counter.sync_calls)
    assert counter.torch_calls > 100  # the counter really watched the call


def test_injection_flags_follow_the_schedule_on_the_device(tiny):
    """Same call, injection on (step 0) and off (past every tau): the edit branches differ only when on,
    and off equals no control at all (the flags really switch, without a Python branch)."""
    ctx, _ = _contexts(tiny)["edit, recompute mode"]
    injector = _injector(tiny, steps=4)
    schedule = injector.schedule
    for branch, name in enumerate(BRANCHES):  # (steps, branches, kinds): the targets' schedule, the source off
        assert [[bool(v) for v in row] for row in injector.flags[:, branch]] == [
            [name in injector.targets and schedule.active(kind, step) for kind in ("app", "motion", "cross")]
            for step in range(4)]
    latents, text = _inputs(tiny.unet, 3)
    with temporal_attention(tiny.unet), torch.inference_mode():
        def run(control):
            return tiny.unet(latents, 500, text, cross_attention_kwargs={"ctx": ctx.at_step(0, 500, control=control)}).sample
        on, late, plain = run(injector.at_step(0)), run(injector.at_step(3)), run(None)
        off_schedule = InjectionSchedule(4, tau_app=0.0, tau_motion=0.0, tau_cross=0.5)
        off = FeatureInjector(off_schedule, BRANCHES, injector.targets,
                              {n: token_alignment(tiny.tokenizer, SOURCE, p) for n, p in
                               (("negative", SOURCE), ("positive", EDITED))}).at_step(3)
        all_off = run(off)
    torch.testing.assert_close(on[:FRAMES], plain[:FRAMES])  # the source branch is never touched
    assert not torch.allclose(on[FRAMES:], plain[FRAMES:], atol=1e-4)
    torch.testing.assert_close(all_off, plain, atol=1e-5, rtol=1e-5)  # explicit maps, nothing replaced
    assert not torch.allclose(late[FRAMES:], plain[FRAMES:], atol=1e-4)  # step 3: cross maps still injected


def test_partition_is_checked_once_per_context_not_per_call(tiny, monkeypatch):
    from diffferv_cli.temporal import plan

    calls = []
    original = plan.check_partition
    monkeypatch.setattr(plan, "check_partition", lambda grid, *a: calls.append(grid) or original(grid, *a))
    ctx = AttentionContext(frames=FRAMES, latent_size=LATENT, trajectories=_trajectories())
    assert len(calls) == 2  # one per grid
    latents, text = _inputs(tiny.unet, 1)
    with temporal_attention(tiny.unet), torch.inference_mode():
        for step in range(3):
            tiny.unet(latents, 500, text, cross_attention_kwargs={"ctx": ctx.at_step(step, 500)})
    assert len(calls) == 2


# --------------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------------

def _step_calls(tiny, unet, steps=4):
    """The edit calls of a 4-step run (injection flags change from step to step)."""
    ctx, _ = _contexts(tiny)["edit, recompute mode"]
    injector = _injector(tiny, steps)
    latents, text = _inputs(tiny.unet, 3)
    timesteps = torch.tensor([900, 600, 300, 0])
    return [unet(latents, timesteps[k], text,
                 cross_attention_kwargs={"ctx": ctx.at_step(k, int(timesteps[k]), control=injector.at_step(k))}).sample
            for k in range(steps)]


def test_unet_call_has_no_graph_break_and_one_graph_serves_every_step(tiny):
    ctx, _ = _contexts(tiny)["edit, recompute mode"]
    latents, text = _inputs(tiny.unet, 3)
    torch._dynamo.reset()
    with temporal_attention(tiny.unet), torch.inference_mode():
        explained = torch._dynamo.explain(tiny.unet)(latents, torch.tensor(500), text,
                                                     cross_attention_kwargs={"ctx": ctx})
        assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
        torch._dynamo.reset()
        compiled = torch.compile(tiny.unet, backend="eager")
        with torch._dynamo.config.patch(error_on_recompile=True):
            outputs = _step_calls(tiny, compiled)
        expected = _step_calls(tiny, tiny.unet)
    torch._dynamo.reset()
    for got, want in zip(outputs, expected, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None and shutil.which("c++") is None,
                    reason="torch.compile's inductor backend needs a C++ compiler on the CPU")
def test_inductor_compiled_unet_equals_eager(tiny):
    torch._dynamo.reset()
    with temporal_attention(tiny.unet), torch.inference_mode():
        compiled = torch.compile(tiny.unet)
        with torch._dynamo.config.patch(error_on_recompile=True):
            outputs = _step_calls(tiny, compiled)
        expected = _step_calls(tiny, tiny.unet)
    torch._dynamo.reset()
    for got, want in zip(outputs, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------------------
# cache I/O behind the loop
# --------------------------------------------------------------------------------------------------

def test_write_behind_runs_in_order_and_reports_errors():
    done = []
    with WriteBehind() as writer:
        for index in range(5):
            writer.submit(lambda index=index: (time.sleep(0.01), done.append(index)))
    assert done == list(range(5))

    def fail():
        raise OSError("disk full")

    writer = WriteBehind()
    writer.submit(fail)
    with pytest.raises(OSError, match="disk full"):
        writer.close()


def test_write_behind_finishes_queued_writes_when_the_loop_is_interrupted():
    done = []
    with pytest.raises(KeyboardInterrupt), WriteBehind() as writer:
        writer.submit(lambda: (time.sleep(0.05), done.append(1)))
        raise KeyboardInterrupt
    assert done == [1]


@pytest.mark.slow
def test_killed_inversion_resumes_to_the_same_latents(tmp_path):
    """Real `diffferv invert` processes killed with SIGKILL at random moments, then resumed: the cached
    latents equal those of an uninterrupted run, bit for bit."""
    from media import make_test_clip
    from safetensors.torch import load_file

    clip = make_test_clip(tmp_path / "clip.mp4", width=96, height=64, frames=4, fps=24)
    steps = 12

    def command(cache):
        return [sys.executable, "-m", "diffferv_cli", "invert", str(clip), "--model", "tiny-random", "--size", "64",
                "--steps", str(steps), "--flow-preset", "ultrafast", "--device", "cpu", "--cache-dir", str(cache)]

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    subprocess.run(command(tmp_path / "whole"), check=True, env=env, capture_output=True)
    rng = random.Random(0)
    kills = 0
    for _ in range(3):
        process = subprocess.Popen(command(tmp_path / "killed"), env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        before = len(list((tmp_path / "killed").glob("*/latents/step-*.safetensors")))
        while process.poll() is None and len(list((tmp_path / "killed").glob("*/latents/step-*.safetensors"))) <= before:
            time.sleep(0.005)  # until this run has written a step
        time.sleep(rng.uniform(0.0, 0.3))
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
        process.wait()
    assert kills >= 1
    subprocess.run(command(tmp_path / "killed"), check=True, env=env, capture_output=True)
    (whole,) = [entry for entry in (tmp_path / "whole").iterdir() if entry.name != ".locks"]
    (killed,) = [entry for entry in (tmp_path / "killed").iterdir() if entry.name != ".locks"]
    for index in range(steps + 1):
        name = f"latents/step-{index:03d}.safetensors"
        assert torch.equal(load_file(whole / name)["latent"], load_file(killed / name)["latent"]), name
