"""Peak host memory (RSS) of `diffferv invert` and `diffferv edit` against clip length: memory must stay
flat (the frames are decoded a pass at a time, the latents of every step read and written a window at a
time), so the longest clip's peak should be within 1.3x of the shortest's.

Each count gets its own synthetic clip (testsrc2, --source-size, 24 fps) and runs, each in a fresh process,
with the tiny random model, one step, at its default working size (short side 512) or `--size`:

    diffferv invert CLIP --model tiny-random --steps 1 --cache-dir CACHE [--size N]
    diffferv edit CLIP -p age --model tiny-random --steps 1 --cache-dir CACHE -o OUT [--size N]

    python bench/bench_clip_memory.py --frames 500 5000 20000 [--size 128] [--source-size 640x360]

At the default size a window's attention (7,296 tokens a frame) sets the peak and a frame costs seconds
on a CPU, so the 20,000-frame sweep is run at --size 128 there; what grows with the clip (frames and
latents per frame) is then smaller, and a run that held the clip would show it all the same (20,000
frames of 228x128 are 1.75 GB).
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

CHILD = r"""
import resource, sys, json
from diffferv_cli.cli import main
sys.argv = ["diffferv", *sys.argv[1:]]
try:
    main()
except SystemExit as exit:
    code = exit.code or 0
else:
    code = 0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"peak_mib": peak, "code": code}), file=sys.stderr)
sys.exit(code)
"""


def run(args: list[str], env: dict) -> dict:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, env=env)
    last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "{}"
    try:
        figures = json.loads(last)
    except ValueError:
        figures = {}
    if done.returncode or "peak_mib" not in figures:
        sys.exit(f"{' '.join(args[:2])} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return {"peak_mib": figures["peak_mib"], "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, nargs="+", default=[500, 5000, 20000])
    parser.add_argument("--source-size", default="640x360", help="WIDTHxHEIGHT of the synthetic clips")
    parser.add_argument("--size", type=int, default=None, help="working short side (default: the model's)")
    parser.add_argument("--work", type=Path, default=None, help="folder for clips and caches (default: a temp folder)")
    args = parser.parse_args()
    width, height = (int(side) for side in args.source_size.split("x"))
    env = {**os.environ, "DIFFFERV_NO_FACE_CHECK": "1"}
    rows = []
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        work = Path(work)
        for frames in args.frames:
            clip = make_test_clip(work / f"clip-{frames}.mp4", width=width, height=height, frames=frames, fps=24)
            cache = work / f"cache-{frames}"
            common = ["--model", "tiny-random", "--steps", "1", "--cache-dir", str(cache),
                      *(["--size", str(args.size)] if args.size else [])]
            invert = run(["invert", str(clip), *common], env)
            edit = run(["edit", str(clip), "-p", "age", *common, "-o", str(work / f"out-{frames}.mp4")], env)
            rows.append({"frames": frames, "invert_peak_mib": round(invert["peak_mib"], 1),
                         "invert_s": round(invert["seconds"], 1), "edit_peak_mib": round(edit["peak_mib"], 1),
                         "edit_s": round(edit["seconds"], 1)})
            print(rows[-1], flush=True)
            for path in cache.rglob("*"):  # the next count's run should not find this one's files
                if path.is_file():
                    path.unlink()
    first, last = rows[0], rows[-1]
    for command in ("invert", "edit"):
        ratio = last[f"{command}_peak_mib"] / first[f"{command}_peak_mib"]
        print(f"{command}: peak RSS at {last['frames']:,} frames / at {first['frames']:,} frames = {ratio:.2f}x")
    report("clip_memory", rows=rows, settings={"source_size": args.source_size, "size": args.size or "default",
                                               "model": "tiny-random", "steps": 1})


if __name__ == "__main__":
    main()
