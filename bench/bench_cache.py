"""Disk used by the inversion cache per frame (default recompute mode: latents only).

The cache holds z_0..z_T in float32, (4, H/8, W/8) per frame and step, plus trajectories and a manifest;
its size does not depend on the UNet's width, so the tiny model gives the same latents shape as SD1.5.

    python bench/bench_cache.py --size 512 --steps 50 --frames 4
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import make_test_clip, report  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--frames", type=int, default=4)
    args = parser.parse_args()

    from diffferv_cli.config import ClipSpec, InversionConfig
    from diffferv_cli.editing.inversion import invert
    from diffferv_cli.models.tiny import build_tiny_random
    from diffferv_cli.video.io import read_clip

    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        video = make_test_clip(work / "clip.mp4", width=args.size, height=args.size, frames=args.frames, fps=24)
        clip = read_clip(video, ClipSpec(short_side=args.size, multiple=64))
        components = build_tiny_random()
        entry = invert(components, clip, InversionConfig(steps=args.steps), cache_dir=work / "cache").entry
        files = [path for path in entry.folder.rglob("*") if path.is_file()]
        latents = sum(p.stat().st_size for p in files if p.parent.name == "latents")
        total = entry.disk_bytes()
        rows = [
            {"figure": "cache bytes per frame (recompute mode)", "MB": total / args.frames / 1e6, "goal": "<= 5 MB"},
            {"figure": "of which latents", "MB": latents / args.frames / 1e6, "goal": ""},
            {"figure": "trajectories + manifest", "MB": (total - latents) / args.frames / 1e6, "goal": ""},
        ]
    report("cache", rows, settings=vars(args), title=f"Inversion cache at {args.size}², T={args.steps}")


if __name__ == "__main__":
    main()
