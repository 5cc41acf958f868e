"""`diffferv batch` throughput and per-job fixed cost, side by side in one run.

    python bench/bench_batch.py throughput [--jobs 8 --size 128 --steps 20 --frames 16]  # 2 local workers vs 1
    python bench/bench_batch.py fixed [--jobs 3]           # full-size SD 1.5 shapes: batch vs one CLI process per job

Throughput: the same jobs file (one clip per job, one preset each) through `batch --workers 2` and
`--workers 1` (a worker gets its share of the CPUs, so one torch thread each on 2 cores), fresh caches.
Fixed cost: the same small jobs (2 frames, 64 px, 1 step) on a folder of the full-size SD 1.5
architecture (random weights, fp16 on disk), run as `diffferv edit` processes one after another and as
one `batch --workers 1`; the difference per job is what a warm worker saves (import, model load, first
calls).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import make_test_clip, report  # noqa: E402


def _timed(command: list[str], env: dict) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    return time.perf_counter() - start


def _jobs(root: Path, count: int, options: dict, tag: str) -> Path:
    """Job i edits frames [i * frames, (i + 1) * frames) of one long clip: a distinct inversion each."""
    path = root / f"jobs-{tag}.jsonl"
    (root / f"out-{tag}").mkdir(exist_ok=True)
    clip = root / "clip.mp4"
    frames = options.get("frames", 4)
    if not clip.exists():
        make_test_clip(clip, width=96, height=64, frames=frames * count, fps=24)
    lines = [json.dumps({"clip": str(clip), "presets": ["age"], "out": str(root / f"out-{tag}" / f"{index}.mp4"),
                         "cache_dir": str(root / f"cache-{tag}"), "start": index * frames, **options})
             for index in range(count)]
    path.write_text("\n".join(lines) + "\n")
    return path


def throughput(root: Path, count: int, env: dict, size: int, steps: int, frames: int) -> list[dict]:
    options = {"model": "tiny-random", "size": size, "steps": steps, "frames": frames, "flow_preset": "ultrafast"}
    times = {workers: _timed([sys.executable, "-m", "diffferv_cli", "batch",
                              str(_jobs(root, count, options, f"w{workers}")), "--workers", str(workers)], env)
             for workers in (2, 1)}
    return [{"figure": f"{count} tiny-model jobs, wall s: 1 worker / 2 workers", "value": f"{times[1]:.1f} / {times[2]:.1f}"},
            {"figure": "throughput, 2 workers / 1 worker", "value": f"{times[1] / times[2]:.2f}"}]


def fixed_cost(root: Path, count: int, env: dict) -> list[dict]:
    import torch

    from diffferv_cli.models.loading import save_components
    from diffferv_cli.models.tiny import build_full_size_random

    model = root / "sd15-random"
    save_components(build_full_size_random().to("cpu", torch.float16), model)
    options = {"model": str(model), "size": 64, "steps": 1, "frames": 2, "flow_preset": "ultrafast", "dtype": "fp32"}
    jobs = _jobs(root, count, options, "batch")
    batch = _timed([sys.executable, "-m", "diffferv_cli", "batch", str(jobs), "--workers", "1"], env)
    single = 0.0
    (root / "out-single").mkdir()
    for index in range(count):
        single += _timed([sys.executable, "-m", "diffferv_cli", "edit", str(root / "clip.mp4"), "-p", "age",
                          "--start", str(index * 2), "--model", str(model), "--size", "64", "--steps", "1",
                          "--frames", "2", "--dtype", "fp32",
                          "--flow-preset", "ultrafast", "--cache-dir", str(root / "cache-single"),
                          "-o", str(root / "out-single" / f"{index}.mp4")], env)
    return [{"figure": f"{count} jobs, full-size SD 1.5 shapes, wall s: one process each / one batch", "value": f"{single:.1f} / {batch:.1f}"},
            {"figure": "fixed cost saved per job by a warm worker, s", "value": f"{(single - batch) / count:.1f}"}]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("part", choices=["throughput", "fixed"])
    parser.add_argument("--jobs", type=int, default=None)
    parser.add_argument("--size", type=int, default=128, help="throughput: working size of each job")
    parser.add_argument("--steps", type=int, default=20, help="throughput: DDIM steps of each job")
    parser.add_argument("--frames", type=int, default=16, help="throughput: frames of each job")
    args = parser.parse_args()
    env = {**os.environ, "DIFFFERV_NO_FACE_CHECK": "1"}
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        if args.part == "throughput":
            rows = throughput(root, args.jobs or 8, env, args.size, args.steps, args.frames)
        else:
            rows = fixed_cost(root, args.jobs or 3, env)
    report(f"batch_{args.part}", rows=rows, settings=vars(args))


if __name__ == "__main__":
    main()
