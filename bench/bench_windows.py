"""Temporal windows: memory and time of invert + edit + write as the clip grows at a fixed window, and the
seams the windows leave.

    python bench/bench_windows.py                      # tiny model, 48 vs 480 frames at 512x512
    python bench/bench_windows.py --part growth --model full-size --size 256 --steps 2 --frames 24 96
    python bench/bench_windows.py --part seams          # 64-frame smooth moving clip: windowed vs one window

Growth: each run is a child process (its peak RSS is the process's own); the goal is the issue's bound
RSS(long) <= 1.3 x RSS(short) + extra frames x (uint8 working frame + one latent), and, for time,
time(long) / time(short) <= 1.1 x frame ratio. Steps are reduced (`--steps`): memory does not grow with
steps (latents stream to and from the cache), time grows linearly with them.

Seams: the same clip inverted and edited with `--window` frames (overlapping windows) and with one window
over the whole clip; per frame the mean |windowed - single| (0..255), averaged over frames next to a
window edge (within 1 frame of where a window starts or ends) vs the frames at window centres; and the
mean |frame(i+1) - frame(i)| of the windowed output across edges vs inside windows (a proxy for the flow
warp error on a clip whose content moves 1 px per frame).
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
from common import TESTS, report  # noqa: E402

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
import torch
torch.set_num_threads(int(sys.argv[6]))
from diffferv_cli.models.tiny import build_full_size_random, build_tiny_random
from diffferv_cli.config import ClipSpec, EditConfig, InversionConfig
from diffferv_cli.video.io import read_clip
sys.path.insert(0, __import__('os').environ['DIFFFERV_TESTS'])
from media import make_test_clip
from diffferv_cli.editing.job import run_edits
model, size, frames, steps, window, work = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), Path(sys.argv[7])
video = make_test_clip(work / "clip.mp4", width=size, height=size, frames=frames, fps=24)
components = build_tiny_random() if model == "tiny" else build_full_size_random()
clip = read_clip(video, ClipSpec(short_side=size, multiple=16 if model == "tiny" else 64))
start, cpu = time.perf_counter(), time.process_time()
run_edits(components, clip, InversionConfig(steps=steps, flow_preset="ultrafast", window_frames=window),
          [("age", EditConfig(prompt_edit="a photo of an old person"))], cache_dir=work / "cache", out=work)
print(json.dumps({"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu,
                  "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  "frame_bytes": int(clip.frames[0].nbytes),
                  "latent_bytes": 4 * 4 * (size // 8) * (size // 8)}))
"""

SEAMS = r"""
import json, sys
from pathlib import Path
import numpy as np, torch
torch.set_num_threads(int(sys.argv[5]))
from diffferv_cli.models.tiny import build_tiny_random
from diffferv_cli.config import ClipSpec, EditConfig, InversionConfig
from diffferv_cli.editing.inversion import invert
from diffferv_cli.editing.sampling import edit
from diffferv_cli.temporal.windows import window_schedule
from diffferv_cli.video.io import write_video, read_clip
frames, size, steps, window, work = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[6])
rng = np.random.default_rng(0)
texture = (rng.random((size, size + frames, 3)) * 255).astype(np.uint8)
import cv2
texture = cv2.GaussianBlur(texture, (0, 0), 3)
clip_frames = np.stack([texture[:, k:k + size] for k in range(frames)])  # pans 1 px per frame
write_video(clip_frames, work / "smooth.mp4", 24)
clip = read_clip(work / "smooth.mp4", ClipSpec(short_side=size, multiple=16))
tiny = build_tiny_random()
config = EditConfig(prompt_edit="a photo of an old person")
results = {}
for label, frames_per_window in (("windowed", window), ("single", frames)):
    inversion = InversionConfig(steps=steps, flow_preset="ultrafast", window_frames=frames_per_window)
    entry = invert(tiny, clip, inversion, cache_dir=work / label).entry
    results[label] = edit(tiny, entry, config).frames.astype(np.float64)
schedule = window_schedule(frames, window, InversionConfig(window_frames=window).overlap)
edges = sorted({e for w in schedule for e in (w.start, w.stop - 1) if 0 < e < frames - 1})
near_edge = sorted({f for e in edges for f in (e - 1, e, e + 1) if 0 <= f < frames})
centres = sorted({(w.start + w.stop) // 2 for w in schedule})
difference = np.abs(results["windowed"] - results["single"]).mean(axis=(1, 2, 3))  # per frame
step_change = np.abs(np.diff(results["windowed"], axis=0)).mean(axis=(1, 2, 3))  # frame i -> i+1
single_change = np.abs(np.diff(results["single"], axis=0)).mean(axis=(1, 2, 3))
across = sorted({e for e in edges} | {e - 1 for e in edges if e > 0})
inside = [i for i in range(frames - 1) if i not in across]
print(json.dumps({"diff_edges": float(difference[near_edge].mean()), "diff_centres": float(difference[centres].mean()),
                  "change_across": float(step_change[across].mean()), "change_inside": float(step_change[inside].mean()),
                  "single_change_across": float(single_change[across].mean()),
                  "single_change_inside": float(single_change[inside].mean()), "windows": len(schedule)}))
"""


def _child(script: str, args: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as work:
        done = subprocess.run([sys.executable, "-c", script, *args, work], capture_output=True, text=True,
                              env={**os.environ, "DIFFFERV_TESTS": str(TESTS)})
        if done.returncode:
            sys.exit(done.stderr[-3000:])
        return json.loads(done.stdout.strip().splitlines()[-1])


def growth(args) -> list[dict]:
    short, long = sorted(args.frames)
    runs = {frames: _child(CHILD, [args.model, str(args.size), str(frames), str(args.steps), str(args.window),
                                   str(args.threads)]) for frames in (short, long)}
    per_frame = runs[long]["frame_bytes"] + runs[long]["latent_bytes"]
    bound = 1.3 * runs[short]["peak_rss_gib"] + (long - short) * per_frame / 2**30
    rss_ratio = runs[long]["peak_rss_gib"] / runs[short]["peak_rss_gib"]
    time_ratio = runs[long]["seconds"] / runs[short]["seconds"]
    cpu_ratio = runs[long]["cpu_seconds"] / runs[short]["cpu_seconds"]
    name = f"{args.model} {args.size}x{args.size}, window {args.window}, T={args.steps}"
    rows = [{"figure": f"peak RSS (GiB), {frames} frames, {name}", "value": runs[frames]["peak_rss_gib"]}
            for frames in (short, long)]
    rows += [{"figure": f"invert+edit+write wall (s), {frames} frames, {name}", "value": runs[frames]["seconds"]}
             for frames in (short, long)]
    rows += [{"figure": f"RSS({long}) vs bound 1.3 x RSS({short}) + frames x (uint8 frame + latent) (GiB)",
              "value": f"{runs[long]['peak_rss_gib']:.2f} vs {bound:.2f}", "goal": "<= bound"},
             {"figure": f"RSS({long}) / RSS({short})", "value": rss_ratio, "goal": "<= 1.3 (full-size)"},
             {"figure": f"time({long}) / time({short}): wall, cpu", "value": f"{time_ratio:.2f}, {cpu_ratio:.2f}",
              "goal": f"<= {1.1 * long / short:.1f}"}]
    return rows


def seams(args) -> list[dict]:
    result = _child(SEAMS, [str(args.seam_frames), str(args.seam_size), str(args.steps), str(args.seam_window),
                            str(args.threads)])
    what = f"{args.seam_frames} frames {args.seam_size}x{args.seam_size}, window {args.seam_window}, tiny, T={args.steps}"
    return [{"figure": f"seams: mean |windowed - single| near window edges vs centres, {what}",
             "value": f"{result['diff_edges']:.2f} vs {result['diff_centres']:.2f}", "goal": "edges not above centres"},
            {"figure": "seams: mean |frame(i+1) - frame(i)| across edges vs inside (windowed)",
             "value": f"{result['change_across']:.2f} vs {result['change_inside']:.2f}"},
            {"figure": "seams: the same for the single-window result",
             "value": f"{result['single_change_across']:.2f} vs {result['single_change_inside']:.2f}"}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("tiny", "full-size"), default="tiny")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--frames", type=int, nargs=2, default=[48, 480])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--window", type=int, default=24)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--part", choices=("all", "growth", "seams"), default="all")
    parser.add_argument("--seam-frames", type=int, default=64)
    parser.add_argument("--seam-size", type=int, default=64)
    parser.add_argument("--seam-window", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="48 vs 96 frames at 128x128, seams at 32 frames")
    args = parser.parse_args()
    if args.quick:
        args.size, args.frames, args.seam_frames = 128, [48, 96], 32
    for part, run in (("growth", growth), ("seams", seams)):
        if args.part in ("all", part):
            started = time.perf_counter()
            rows = run(args)
            report(f"windows_{part}", rows, settings={**vars(args), "seconds": time.perf_counter() - started},
                   title=f"Temporal windows: {part}")


if __name__ == "__main__":
    main()
