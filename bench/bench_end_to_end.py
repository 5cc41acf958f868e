"""End to end: flow, VAE encode, inversion and edit of one clip, with the full-size SD1.5-shaped model
(random weights): seconds per stage and peak device memory.

    python bench/bench_end_to_end.py --device cuda                    # 16 frames at 512x512, T=50, fp16
    python bench/bench_end_to_end.py --device cuda --compile          # the UNet through torch.compile
    python bench/bench_end_to_end.py --device cpu       # a smoke run: 4 frames at 128x128, T=2

The clip is generated in memory (`common.synthetic_clip`: a drifting textured background and a disk
crossing it), so no video file is decoded or written: the figures are the diffusion job's own. Stages
are timed from the job's progress reports (flow = optical flow and trajectory linking; encode = VAE
encode; invert = the T inversion steps; edit = the T edit steps, preset `age`, recompute feature mode,
3 branches; decode = VAE decode). "peak device memory" is torch.cuda.max_memory_allocated over the
whole run (CUDA only). Random weights cost what the real ones cost; the output means nothing.
Without `--warmup` the figures are those of a fresh process, as a user's `diffferv` run pays them: on a
GPU they include one-time kernel selection for every new tensor shape.
No assertion: it only reports.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import report, synthetic_clip  # noqa: E402

EDITED = "a photo of an old person"


class Stages:
    """Progress callback: each stage lasts from the end of the previous one (or `start`) to its own last
    report, so the stages add up to the run."""

    def __init__(self, device: torch.device):
        self.device, self.ends = device, {}
        self.start = time.perf_counter()

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.device.type == "cuda" and done == total:
            torch.cuda.synchronize(self.device)
        self.ends[stage.split(":")[0]] = time.perf_counter()

    def seconds(self) -> dict[str, float]:
        spans, previous = {}, self.start
        for name, end in self.ends.items():
            spans[name], previous = end - previous, end
        return spans


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=None, help="default 16 on a GPU, 4 on the CPU")
    parser.add_argument("--size", type=int, default=None, help="frame height in pixels; default 512 on a GPU, "
                                                                "128 on the CPU")
    parser.add_argument("--width", type=int, default=None, help="frame width (default: --size)")
    parser.add_argument("--steps", type=int, default=None, help="default 50 on a GPU, 2 on the CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    parser.add_argument("--window-frames", type=int, default=24)
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet (both loops)")
    parser.add_argument("--warmup", action="store_true",
                        help="run a 2-step invert + edit first, so one-time costs (kernel selection, compiling) "
                             "are left out of the figures")
    args = parser.parse_args(argv)
    on_gpu = torch.device(args.device).type != "cpu"  # the CPU gets a smoke size: the full run takes hours there
    args.frames = args.frames or (16 if on_gpu else 4)
    args.size = args.size or (512 if on_gpu else 128)
    args.steps = args.steps or (50 if on_gpu else 2)

    from diffferv_cli.config import EditConfig, InversionConfig
    from diffferv_cli.editing.inversion import invert
    from diffferv_cli.editing.sampling import edit
    from diffferv_cli.models.devices import pick_dtype
    from diffferv_cli.models.tiny import build_full_size_random

    device = torch.device(args.device)
    dtype = pick_dtype(device, args.dtype)
    components = build_full_size_random().to(device, dtype)
    clip = synthetic_clip(args.frames, args.size, args.width or args.size)
    config = InversionConfig(steps=args.steps, window_frames=args.window_frames)
    if args.warmup:
        with tempfile.TemporaryDirectory() as work:
            warm = invert(components, clip, config.model_copy(update={"steps": 2}), cache_dir=Path(work),
                          compile_unet=args.compile)
            edit(components, warm.entry, EditConfig(prompt_edit=EDITED), compile_unet=args.compile)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with tempfile.TemporaryDirectory() as work:
        stages = Stages(device)
        start = stages.start
        outcome = invert(components, clip, config, cache_dir=Path(work), progress=stages,
                         compile_unet=args.compile)
        inverted = time.perf_counter()
        edit(components, outcome.entry, EditConfig(prompt_edit=EDITED), progress=stages,
             compile_unet=args.compile)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        finished = time.perf_counter()

    rows = [{"figure": f"{name} s", "value": round(seconds, 3)} for name, seconds in stages.seconds().items()]
    rows += [{"figure": "invert total s (flow, encode, steps)", "value": round(inverted - start, 3)},
             {"figure": "edit total s (steps, decode)", "value": round(finished - inverted, 3)},
             {"figure": "invert + edit s", "value": round(finished - start, 3)}]
    if device.type == "cuda":
        rows.append({"figure": "peak device memory GiB",
                     "value": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)})
    report("end_to_end", rows, settings={"frames": args.frames, "size": f"{args.width or args.size}x{args.size}",
                                         "steps": args.steps, "device": str(device), "dtype": str(dtype),
                                         "compile": args.compile, "window_frames": args.window_frames,
                                         "warmup": args.warmup},
           title=f"invert + edit, full-size SD1.5 shapes, {args.frames} frames, T={args.steps}")


if __name__ == "__main__":
    main()
