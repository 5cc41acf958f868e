"""One full-size SD1.5-shaped UNet step with SWCFA + TTA against stock attention.

    python bench/bench_unet_step.py                          # CPU, 256x256 (latent 32x32), 8 and 32 frames
    python bench/bench_unet_step.py --frames 8 --repeats 1   # shorter
    python bench/bench_unet_step.py --device cuda --dtype fp16 --size 512

Random weights (components.build_full_size_random): real cost, no download. One branch, batch = frames,
text embeddings random (77 tokens). Trajectories: a synthetic smooth-motion partition, the whole frame
translating by (0.3, 0.5) latent pixels per frame (scaled down with each grid), so rows have many lengths
(long ones through the clip, shorter ones entering/leaving at the borders, a few singletons) like real
flow; `--trajectories static` uses one full-length trajectory per position instead.

Figures: seconds per UNet step (best of --repeats after 1 warmup), the temporal/stock ratio (goal <= 1.3x)
and the 32-frame/8-frame ratio of the temporal step (goal <= 4.4x). No assertion: it only reports.
On CPU both wall-clock and process CPU seconds are reported; on a shared machine use `--threads 1` and
read the CPU-time columns, which other processes barely disturb (wall time there can swing 2x).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import report  # noqa: E402

from diffferv_cli.temporal import AttentionContext, temporal_attention  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference_attention import (  # noqa: E402
    static_partition,
    trajectory_set,
    translating_partition,
)

from diffferv_cli.models.tiny import build_full_size_random  # noqa: E402

VELOCITY = (0.3, 0.5)  # latent pixels per frame, rows and columns


def trajectories_for(latent: tuple[int, int], frames: int, kind: str):
    def build(height: int, width: int, frames: int):
        if kind == "static":
            return static_partition(height, width, frames)
        scale = height / latent[0]
        return translating_partition(height, width, frames, (VELOCITY[0] * scale, VELOCITY[1] * scale))

    return trajectory_set(latent, 4, frames, build)


def timed(fn, repeats: int) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of the fastest of `repeats` calls after one warmup call."""
    fn()
    best_wall = best_cpu = float("inf")
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        best_wall = min(best_wall, time.perf_counter() - wall)
        best_cpu = min(best_cpu, time.process_time() - cpu)
    return best_wall, best_cpu


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--size", type=int, default=256, help="frame side in pixels (latent = size / 8)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--window", type=int, default=3)
    parser.add_argument("--trajectories", default="translating", choices=["translating", "static"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    device = torch.device(args.device)
    unet = build_full_size_random().unet.to(device=device, dtype=dtype)
    latent = (args.size // 8, args.size // 8)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    rows, temporal_seconds = [], {}
    for frames in args.frames:
        generator = torch.Generator().manual_seed(0)
        latents = torch.randn(frames, 4, *latent, generator=generator).to(device, dtype)
        text = torch.randn(frames, 77, 768, generator=generator).to(device, dtype)
        trajectories = trajectories_for(latent, frames, args.trajectories).to(device)
        ctx = AttentionContext(frames=frames, latent_size=latent, trajectories=trajectories, window=args.window)

        def step(kwargs, latents=latents, text=text):
            def run():
                unet(latents, 500, text, **kwargs)
                sync()
            return run

        with torch.inference_mode():
            stock = timed(step({}), args.repeats)
            with temporal_attention(unet):
                swcfa = timed(step({"cross_attention_kwargs": {"ctx": ctx.at_step(0, 500, tta=False)}}), args.repeats)
                temporal = timed(step({"cross_attention_kwargs": {"ctx": ctx}}), args.repeats)
        temporal_seconds[frames] = temporal
        row = {"frames": frames, "stock s": stock[0], "swcfa s": swcfa[0], "swcfa+tta s": temporal[0],
               "ratio": temporal[0] / stock[0]}
        if device.type == "cpu":
            row.update({"stock cpu s": stock[1], "swcfa cpu s": swcfa[1], "swcfa+tta cpu s": temporal[1],
                        "cpu ratio": temporal[1] / stock[1]})
        print(", ".join(f"{key} {value:.2f}" for key, value in row.items()), flush=True)
        row["goal"] = "ratio <= 1.3"  # in the row too, so the summary table (run_all.py) shows it
        rows.append(row)

    settings = {"size": args.size, "latent": latent, "device": str(device), "dtype": args.dtype,
                "repeats": args.repeats, "window": args.window, "trajectories": args.trajectories,
                "velocity": VELOCITY if args.trajectories == "translating" else None}
    settings["threads"] = torch.get_num_threads() if device.type == "cpu" else None
    settings["goals"] = {"ratio": "<= 1.3", "frames_32_over_8": "<= 4.4"}
    if 8 in temporal_seconds and 32 in temporal_seconds:
        column = 1 if device.type == "cpu" else 0
        scaling = temporal_seconds[32][column] / temporal_seconds[8][column]
        settings["frames_32_over_8"] = scaling
        print(f"32-frame / 8-frame time of the SWCFA+TTA step ({'cpu' if column else 'wall'}): {scaling:.2f}x "
              f"(goal <= 4.4x)")
        rows.append({"frames": f"32 / 8, SWCFA+TTA step ({'cpu' if column else 'wall'} s)", "ratio": scaling,
                     "goal": "<= 4.4"})
    report("unet_step", rows, settings, title="One UNet step: SWCFA+TTA vs stock attention")


if __name__ == "__main__":
    main()
