"""Edit step time in recompute mode (source branch in the batch, only latents on disk) vs disk mode
(features read from disk), full-size SD1.5-shaped model with random weights.

    python bench/bench_feature_modes.py --size 256 --frames 2 --steps 3 [--device cuda]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import make_test_clip, report  # noqa: E402


def _step_times(run) -> list[float]:
    stamps: list[float] = []

    def progress(stage, done, total):
        if stage == "edit":
            stamps.append(time.perf_counter())

    start = time.perf_counter()
    run(progress)
    edges = [start, *stamps]
    return [b - a for a, b in zip(edges, edges[1:], strict=False)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--frames", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import torch

    from diffferv_cli.config import ClipSpec, EditConfig, InversionConfig
    from diffferv_cli.editing.inversion import invert
    from diffferv_cli.editing.sampling import edit
    from diffferv_cli.models.devices import pick_dtype
    from diffferv_cli.models.tiny import build_full_size_random
    from diffferv_cli.video.io import read_clip

    device = torch.device(args.device)
    components = build_full_size_random().to(device, pick_dtype(device))
    config = EditConfig(prompt_edit="a photo of an old person", tau_app=1.0)
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        video = make_test_clip(work / "clip.mp4", width=args.size, height=args.size, frames=args.frames, fps=24)
        clip = read_clip(video, ClipSpec(short_side=args.size, multiple=64))
        entry = invert(components, clip, InversionConfig(steps=args.steps, feature_mode="disk",
                                                         flow_preset="ultrafast"), cache_dir=work / "cache").entry
        features_mb = sum(p.stat().st_size for p in (entry.folder / "features").iterdir()) / 1e6
        times = {}
        for mode in ("recompute", "disk"):
            # the first step warms up; the rest are timed
            per_step = _step_times(lambda progress, mode=mode: edit(components, entry, config, feature_mode=mode,
                                                                     progress=progress))
            times[mode] = sum(per_step[1:]) / max(len(per_step) - 1, 1)
    rows = [
        {"figure": "recompute mode, s/step", "value": times["recompute"], "goal": ""},
        {"figure": "disk mode, s/step", "value": times["disk"], "goal": ""},
        {"figure": "recompute / disk", "value": times["recompute"] / times["disk"], "goal": "<= 1.6"},
        {"figure": "disk-mode features, MB per frame per step", "value": features_mb / args.frames / args.steps,
         "goal": ""},
    ]
    report("feature_modes", rows, settings=vars(args),
           title=f"Feature modes, SD1.5-shaped UNet, {args.size}², {args.frames} frames, {args.device}")


if __name__ == "__main__":
    main()
