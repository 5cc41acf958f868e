"""One clip across several processes: the windows of each UNet pass split across torch.distributed ranks,
partial blends summed by one all-reduce. Checked against one process: the arithmetic (partial blends add
up to the whole blend, every window on exactly one rank) and a real 2-rank `torchrun` inversion on the CPU
(gloo) whose cached latents equal a one-process run's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffferv_cli.temporal.ranks import SINGLE, Ranks, from_environment, rank_device
from diffferv_cli.temporal.windows import NoiseBlend, blend_weights, window_schedule


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_every_window_runs_on_exactly_one_rank_and_the_partial_blends_add_up(world):
    windows = window_schedule(31, 8, 2)
    weights = blend_weights(windows, 31)
    generator = torch.Generator().manual_seed(0)
    noises = [torch.randn(window.frames, 4, 3, 5, generator=generator) for window in windows]
    whole = NoiseBlend(windows, weights, (31, 4, 3, 5))
    for index, noise in enumerate(noises):
        whole.add(index, noise)
    owners = [[rank for rank in range(world) if Ranks(rank, world).owns(index)] for index in range(len(windows))]
    assert all(len(owner) == 1 for owner in owners)
    partials = []
    for rank in range(world):
        partial = NoiseBlend(windows, weights, (31, 4, 3, 5))
        for index, noise in enumerate(noises):
            if Ranks(rank, world).owns(index):
                partial.add(index, noise)
        partials.append(partial.result)
    assert torch.allclose(sum(partials), whole.result, atol=1e-6)
    if world > 1:
        assert all(partial.abs().sum() > 0 for partial in partials[:len(windows)])  # each rank has work


@pytest.mark.parametrize("world, count", [(1, 7), (2, 7), (3, 7), (4, 2), (5, 12)])
def test_the_decode_shares_cover_every_frame_once_in_order(world, count):
    shares = [Ranks(rank, world).share_of(count) for rank in range(world)]
    assert [index for share in shares for index in range(count)[share]] == list(range(count))
    assert max(share.stop - share.start for share in shares) - min(share.stop - share.start for share in shares) <= 1


def test_without_a_launcher_there_is_one_rank(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert from_environment(torch.device("cpu")) is SINGLE
    assert SINGLE.main and SINGLE.owns(7) and SINGLE.share("x") == "x"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert rank_device(torch.device("cuda")) == torch.device("cuda", 1)  # each rank on its own GPU
    assert rank_device(torch.device("cuda", 0)) == torch.device("cuda", 0)  # an explicit index is kept
    assert rank_device(torch.device("cpu")) == torch.device("cpu")


def _latents(cache: Path) -> list[torch.Tensor]:
    from safetensors.torch import load_file

    (entry,) = [path for path in cache.iterdir() if (path / "manifest.json").is_file()]
    files = sorted((entry / "latents").glob("step-*.safetensors"))
    return entry.name, [next(iter(load_file(str(path)).values())) for path in files]


def test_a_two_rank_torchrun_inversion_equals_one_process(tmp_path):
    from media import make_test_clip

    clip = make_test_clip(tmp_path / "clip.mp4", width=64, height=48, frames=10, fps=24)
    common = ["invert", str(clip), "--model", "tiny-random", "--size", "48", "--steps", "2", "--frames", "10",
              "--window-frames", "4", "--flow-preset", "ultrafast", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DIFFFERV_NO_FACE_CHECK": "1"}
    env.pop("WORLD_SIZE", None)
    one = subprocess.run([sys.executable, "-m", "diffferv_cli", *common, "--cache-dir", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          str(_free_port()), "-m", "diffferv_cli", *common, "--cache-dir", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("Inversion 2 steps run") == 1  # rank 0 speaks for the job
    key_one, single = _latents(tmp_path / "one")
    key_two, split = _latents(tmp_path / "two")
    assert key_one == key_two and len(single) == len(split) == 3
    assert torch.equal(single[0], split[0])  # z_0: the same encode
    for step, (a, b) in enumerate(zip(single, split, strict=True)):
        assert torch.allclose(a, b, atol=1e-5), (step, (a - b).abs().max())


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_two_rank_torchrun_edit_equals_one_process_and_rank_0_alone_writes(tmp_path):
    import numpy as np
    from media import decode_all, make_test_clip

    clip = make_test_clip(tmp_path / "clip.mp4", width=64, height=48, frames=10, fps=24)
    common = ["edit", str(clip), "-p", "age", "-p", "blond", "--model", "tiny-random", "--size", "48", "--steps", "2",
              "--frames", "10", "--window-frames", "4", "--flow-preset", "ultrafast", "--device", "cpu", "--lossless"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DIFFFERV_NO_FACE_CHECK": "1"}
    env.pop("WORLD_SIZE", None)
    outputs = {}
    for name, launcher in (("one", []), ("two", ["-m", "torch.distributed.run", "--nproc-per-node", "2",
                                                 "--master-port", str(_free_port())])):
        out = tmp_path / f"out-{name}"
        command = [sys.executable, *(launcher or []), "-m", "diffferv_cli", *common, "--cache-dir",
                   str(tmp_path / f"cache-{name}"), "-o", str(out)]
        run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
        assert run.returncode == 0, run.stderr[-3000:]
        outputs[name] = out
    assert sorted(path.name for path in outputs["one"].iterdir()) == \
        sorted(path.name for path in outputs["two"].iterdir()) == ["clip.age.mp4", "clip.blond.mp4"]
    for name in ("clip.age.mp4", "clip.blond.mp4"):
        single, split = decode_all(outputs["one"] / name), decode_all(outputs["two"] / name)
        difference = np.abs(single.astype(int) - split.astype(int))
        assert difference.max() <= 2 and difference.mean() < 0.05, (name, difference.max(), difference.mean())
