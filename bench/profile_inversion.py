"""Where a warm process spends an inversion: the torch profiler's table (by device time) of a 6-step
inversion of 16 frames at 512x512, full-size SD1.5 shapes with random weights, after a 3-step warm-up run
in the same process (the first run pays one-time kernel selection: cuDNN attention graphs per new shape).

    python bench/profile_inversion.py                   # CUDA (fp16)
    python bench/profile_inversion.py --device cpu --size 128 --frames 4

Prints the wall seconds of the profiled run (flow, VAE encode and the 6 steps) and the table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import synthetic_clip  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    from diffferv_cli.config import InversionConfig
    from diffferv_cli.editing.inversion import invert
    from diffferv_cli.models.devices import pick_dtype
    from diffferv_cli.models.tiny import build_full_size_random

    device = torch.device(args.device)
    components = build_full_size_random().to(device, pick_dtype(device))
    clip = synthetic_clip(args.frames, args.size, args.size)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with tempfile.TemporaryDirectory() as work:
        invert(components, clip, InversionConfig(steps=3), cache_dir=Path(work) / "warm-up")
        synchronize()
        with profile(activities=activities) as profiler:
            start = time.perf_counter()
            invert(components, clip, InversionConfig(steps=args.steps), cache_dir=Path(work) / "profiled")
            synchronize()
            seconds = time.perf_counter() - start
    print(f"{args.steps}-step inversion of {args.frames} frames at {args.size}x{args.size} (flow and encode "
          f"included), warm process: {seconds:.2f} s")
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(profiler.key_averages().table(sort_by=sort, row_limit=22, max_name_column_width=60))


if __name__ == "__main__":
    main()
