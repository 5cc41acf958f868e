"""DIS optical flow: time per frame pair and end-point error on a known warp, per preset.

    python bench/bench_flow.py [--size 512] [--repeat 5]

The known warp: frame b is frame a under a small rotation + zoom + sub-pixel shift (cv2.warpAffine), so
the true flow at p is M [p; 1] - p. The error is the mean end-point error (px) away from the border.
Also times `compute_flow` per pair (forward + backward + occlusion check) with the default preset.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent)]  # common.py, and diffferv_cli without an install

from common import best_time, report, textured_clip, textured_image  # noqa: E402

from diffferv_cli.temporal.flow import DISFlow, compute_flow  # noqa: E402


def known_warp(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(frame_a, frame_b, true forward flow (H, W, 2))."""
    frame_a = textured_image(size, size, seed=3)
    matrix = cv2.getRotationMatrix2D((size / 2, size / 2), 2.0, 1.02)
    matrix[:, 2] += (3.3, -2.6)
    frame_b = cv2.warpAffine(
        frame_a, matrix, (size, size), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT
    )
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    true_x = matrix[0, 0] * xx + matrix[0, 1] * yy + matrix[0, 2] - xx
    true_y = matrix[1, 0] * xx + matrix[1, 1] * yy + matrix[1, 2] - yy
    return frame_a, frame_b, np.stack([true_x, true_y], -1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    frame_a, frame_b, true_flow = known_warp(args.size)
    margin = args.size // 16
    interior = (slice(margin, -margin), slice(margin, -margin))
    rows = []
    for preset in ("ultrafast", "fast", "medium"):
        estimator = DISFlow(preset)
        seconds = best_time(lambda estimator=estimator: estimator(frame_a, frame_b), repeat=args.repeat)
        error = np.linalg.norm(estimator(frame_a, frame_b) - true_flow, axis=-1)[interior]
        rows.append(
            {
                "step": f"DIS {preset}, one direction",
                "ms_per_pair": 1e3 * seconds,
                "epe_mean_px": float(error.mean()),
                "epe_p95_px": float(np.percentile(error, 95)),
            }
        )

    clip = textured_clip(9, args.size, args.size)
    seconds = best_time(lambda: compute_flow(clip), repeat=1)
    rows.append(
        {
            "step": "compute_flow (medium: fwd + bwd + occlusion)",
            "ms_per_pair": 1e3 * seconds / (len(clip) - 1),
            "epe_mean_px": None,
            "epe_p95_px": None,
        }
    )
    report(
        "flow",
        rows,
        settings={"size": args.size, "repeat": args.repeat, "cv2_threads": cv2.getNumThreads()},
        title=f"DIS flow at {args.size}x{args.size}",
    )


if __name__ == "__main__":
    main()
