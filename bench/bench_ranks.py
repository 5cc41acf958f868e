"""One clip across processes: `diffferv invert` (and then `edit`) of a clip of several temporal windows in
one process against `torchrun --nproc-per-node 2` (gloo), one torch thread per process, side by side in
one run; the latents' largest difference and the bytes all-reduced per step.

    python bench/bench_ranks.py [--frames 48] [--size 128] [--steps 8] [--window-frames 8] [--model tiny-random]

Wall times are whole commands (import, model build, flow and encode on rank 0 included), so the speed-up
of the UNet passes alone is higher than the one printed.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import make_test_clip, report  # noqa: E402


def _port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _run(command: list[str], env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def _latents(cache: Path):
    """(latents of every step, number of temporal windows) of the one entry in `cache`."""
    import json

    from safetensors.torch import load_file

    (entry,) = [path for path in cache.iterdir() if (path / "manifest.json").is_file()]
    windows = len(json.loads((entry / "manifest.json").read_text())["request"]["windows"])
    return [next(iter(load_file(str(path)).values())) for path in sorted((entry / "latents").glob("step-*"))], windows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=48)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--window-frames", type=int, default=8)
    parser.add_argument("--model", default="tiny-random")
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DIFFFERV_NO_FACE_CHECK": "1"}
    env.pop("WORLD_SIZE", None)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        clip = make_test_clip(root / "clip.mp4", width=args.size * 4 // 3, height=args.size, frames=args.frames, fps=24)
        common = [str(clip), "--model", args.model, "--size", str(args.size), "--steps", str(args.steps), "--frames",
                  str(args.frames), "--window-frames", str(args.window_frames), "--flow-preset", "ultrafast",
                  "--device", "cpu"]
        times = {}
        for name, launcher in (("1 process", []),
                               ("2 ranks", ["-m", "torch.distributed.run", "--nproc-per-node", "2",
                                            "--master-port", str(_port())])):
            cache = root / name.replace(" ", "-")
            times[name] = {
                "invert": _run([sys.executable, *launcher, "-m", "diffferv_cli", "invert", *common,
                                "--cache-dir", str(cache)], env),
                "edit": _run([sys.executable, *launcher, "-m", "diffferv_cli", "edit", *common, "-p", "age",
                              "--cache-dir", str(cache), "-o", str(root / f"{name}.mp4").replace(" ", "-")], env),
            }
        (single, windows), (split, _) = _latents(root / "1-process"), _latents(root / "2-ranks")
        difference = max(float((a - b).abs().max()) for a, b in zip(single, split, strict=True))
        latent = single[0]
        for stage in ("invert", "edit"):
            one, two = times["1 process"][stage], times["2 ranks"][stage]
            rows.append({"stage": stage, "1 process s": round(one, 1), "2 ranks s": round(two, 1),
                         "speed-up": round(one / two, 2)})
        per_pass = latent.numel() * 4  # float32 noise of the whole clip, one branch
        rows.append({"stage": f"latents, largest |1 process - 2 ranks| ({windows} windows)", "1 process s": "",
                     "2 ranks s": "", "speed-up": f"{difference:.2e}"})
        rows.append({"stage": "bytes all-reduced per step: inversion / edit (3 branches)", "1 process s": "",
                     "2 ranks s": "", "speed-up": f"{per_pass / 1e6:.2f} / {3 * per_pass / 1e6:.2f} MB"})
    report("ranks", rows=rows, settings=vars(args))


if __name__ == "__main__":
    main()
