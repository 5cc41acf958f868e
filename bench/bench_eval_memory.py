"""Peak host memory (RSS) of `diffferv eval ORIGINAL EDITED` against the clip's length: eval reads both
videos in step, a chunk of frames at a time, and computes every metric as they go by, so its peak should
not grow with the number of frames (before, both videos were decoded whole: 2 x frames x H x W x 3 bytes).

    python bench/bench_eval_memory.py                          # 200, 2000 and 8000 frames of 96x64
    python bench/bench_eval_memory.py --frames 100 400 1600 --width 160 --height 96
    python bench/bench_eval_memory.py --quick                  # 50, 200 and 800 frames

Each count runs the command as a user does (`python -m diffferv_cli eval A B --json out.json`, the default
settings: identity with dlib when installed, flow-warping error with DIS medium) in a process of its own,
whose peak RSS (the largest of it and its ffmpeg decoders, which are far smaller) is read with
`getrusage(RUSAGE_CHILDREN)` by a small wrapper process started for that count alone, so one count's peak
never shows in another's; the clips are made beforehand, in this process. The original is ffmpeg's
`testsrc2`, the "edit" its `testsrc`, both H.264 at `--width` x `--height`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import make_test_clip, report  # noqa: E402

# Runs one `eval` and prints its peak RSS (KiB on Linux) and wall time: the wrapper's only child is eval.
WRAPPER = r"""
import json, resource, subprocess, sys, time
start = time.perf_counter()
done = subprocess.run([sys.executable, "-m", "diffferv_cli", "eval", *sys.argv[1:]], capture_output=True, text=True)
if done.returncode:
    sys.exit(done.stdout[-2000:] + done.stderr[-2000:])
print(json.dumps({"peak_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
                  "seconds": time.perf_counter() - start}))
"""


def measure(original: Path, edited: Path, out: Path, options: list[str]) -> dict:
    done = subprocess.run([sys.executable, "-c", WRAPPER, str(original), str(edited), "--json", str(out),
                           "--overwrite", *options], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"eval failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, nargs="+", default=[200, 2000, 8000])
    parser.add_argument("--width", type=int, default=96)
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--no-temporal", action="store_true", help="pass --no-temporal to eval")
    parser.add_argument("--quick", action="store_true", help="50, 200 and 800 frames")
    args = parser.parse_args()
    counts = sorted([50, 200, 800] if args.quick else args.frames)
    options = ["--no-temporal"] if args.no_temporal else []
    rows, peaks = [], {}
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        for count in counts:
            size = {"width": args.width, "height": args.height, "frames": count, "fps": 24}
            original = make_test_clip(work / f"original_{count}.mp4", **size)
            edited = make_test_clip(work / f"edited_{count}.mp4", pattern="testsrc", **size)
            figures = measure(original, edited, work / "metrics.json", options)
            compared = json.loads((work / "metrics.json").read_text())
            assert compared["frames"] == count, compared["frames"]
            height, width = compared["size"]["height"], compared["size"]["width"]
            peaks[count] = figures["peak_kib"] / 2**10
            whole = 2 * count * height * width * 3 / 2**20  # what the two decoded inputs alone took before
            print(f"{count} frames: peak RSS {peaks[count]:.0f} MiB, {figures['seconds']:.1f} s "
                  f"(the decoded frames, held whole: {whole:.0f} MiB)", flush=True)
            rows += [{"figure": f"peak RSS (MiB), eval of {count} frames", "value": peaks[count], "goal": ""},
                     {"figure": f"wall time (s), eval of {count} frames", "value": figures["seconds"], "goal": ""},
                     {"figure": f"both inputs decoded whole (MiB), {count} frames", "value": whole, "goal": ""}]
    ratio = peaks[counts[-1]] / peaks[counts[0]]
    print(f"peak RSS ratio, {counts[-1]} / {counts[0]} frames: {ratio:.3f}")
    rows.append({"figure": f"peak RSS ratio, {counts[-1]} / {counts[0]} frames", "value": ratio, "goal": "~1 (flat)"})
    report("eval_memory", rows, settings={**vars(args), "counts": counts, "compared_size": [width, height]},
           title=f"eval memory against clip length, {args.width}x{args.height}")


if __name__ == "__main__":
    main()
