"""Peak host memory (RSS) of one edit: decode, flow, VAE encode, inversion and edit steps, VAE decode,
write, with the full-size SD1.5-shaped model (random weights). Memory does not grow with the number of
steps (latents are streamed to and from the cache), so a run at reduced steps measures the peak of a
full run.

    python bench/bench_edit_memory.py --size 512 --frames 16 --steps 1 [--width 512] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import resource
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
from diffferv_cli.models.tiny import build_full_size_random
from diffferv_cli.models.devices import pick_dtype
from diffferv_cli.config import ClipSpec, EditConfig, InversionConfig
from diffferv_cli.video.io import read_clip
sys.path.insert(0, sys.argv[7])
from media import make_test_clip
from diffferv_cli.editing.job import run_edits
size, frames, steps, device, work, width = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], Path(sys.argv[5]), int(sys.argv[6])
device = torch.device(device)
video = make_test_clip(work / "clip.mp4", width=width or size * 16 // 9 // 64 * 64, height=size, frames=frames, fps=24)
clip = read_clip(video, ClipSpec(short_side=size, multiple=64))
components = build_full_size_random().to(device, pick_dtype(device))
start = time.perf_counter()
run_edits(components, clip, InversionConfig(steps=steps, flow_preset="ultrafast"),
          [("age", EditConfig(prompt_edit="a photo of an old person"))], cache_dir=work / "cache", out=work)
peak_gpu = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
print(json.dumps({"seconds": time.perf_counter() - start, "peak_gpu_gib": peak_gpu,
                  "working_size": list(clip.geometry.working_size)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--width", type=int, default=0, help="clip width (default: 16:9 for --size)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", CHILD, str(args.size), str(args.frames), str(args.steps),
                               args.device, work, str(args.width), str(TESTS)], capture_output=True, text=True)
        if done.returncode:
            sys.exit(done.stderr[-2000:])
        child = json.loads(done.stdout.strip().splitlines()[-1])
        peak_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB -> GiB
    # one "value" column with the unit in the figure's name, so the summary table does not label seconds as GiB
    rows = [{"figure": f"peak host RSS (GiB), edit of {args.frames} frames", "value": peak_rss, "goal": "<= 16 GiB"},
            {"figure": "peak GPU memory (GiB)", "value": child["peak_gpu_gib"], "goal": ""},
            {"figure": "invert + edit + write (s)", "value": child["seconds"], "goal": ""},
            {"figure": "wall time, model build included (s)", "value": time.perf_counter() - started, "goal": ""}]
    report("edit_memory", rows, settings={**vars(args), "working_size": child["working_size"]},
           title=f"Edit memory, SD1.5-shaped model, {args.device}")


if __name__ == "__main__":
    main()
