"""Trajectory building: the vectorised `build_trajectories` against the plain-Python reference.

    python bench/bench_trajectories.py [--frames 32] [--size 512] [--repeat 3]

A synthetic textured clip with smooth motion and a moving occluder (bench/common.py), DIS medium flow
computed once and shared, every self-attention grid of SD1.5 at that size (64², 32², 16², 8² at 512).
Times: linking alone per grid (flow already resampled to the grid, the same input for both), resampling
the flow to all grids (`resized_many`, used by `build_trajectories`, against one `resized` per grid, used
by the naive path), and end to end: `build_trajectories(flow, grids)` against `naive_trajectories(flow,
h, w)` for each grid, from the full-resolution flow; speedup = naive / fast. Also checks that both give
the same partition and shows how much of the (n_traj, max_len) index is padding, and how much of the
padded attention cost (rows * len²) the length buckets of `trajectories.buckets` remove.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent)]  # common.py, and diffferv_cli without an install

from common import best_time, report, textured_clip  # noqa: E402

from diffferv_cli.temporal.flow import compute_flow  # noqa: E402
from diffferv_cli.temporal.trajectories import (  # noqa: E402
    buckets,
    build_grid_trajectories,
    build_trajectories,
    naive_trajectories,
    token_grids,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--size", type=int, default=512, help="working size (square), pixels")
    parser.add_argument("--repeat", type=int, default=3, help="repeats of the vectorised timings (best kept)")
    args = parser.parse_args()

    clip = textured_clip(args.frames, args.size, args.size)
    start = time.perf_counter()
    flow = compute_flow(clip)
    flow_seconds = time.perf_counter() - start
    grids = token_grids((args.size // 8, args.size // 8), 4)

    on_grids = flow.resized_many(grids)
    rows, fast_links, naive_links = [], 0.0, 0.0
    for height, width in grids:
        on_grid = on_grids[(height, width)]
        fast_link = best_time(
            lambda g=on_grid, h=height, w=width: build_grid_trajectories(g, h, w), args.repeat
        )
        start = time.perf_counter()
        naive = naive_trajectories(on_grid, height, width)
        naive_link = time.perf_counter() - start
        fast_links, naive_links = fast_links + fast_link, naive_links + naive_link

        grid = build_grid_trajectories(on_grid, height, width)
        same = {tuple(row[row >= 0].tolist()) for row in grid.index.numpy()} == {tuple(t) for t in naive}
        lengths = grid.lengths.double()
        padded_cost = len(lengths) * float(lengths[0]) ** 2
        bucket_cost = sum((rows_.stop - rows_.start) * padded**2 for rows_, padded in buckets(grid))
        rows.append(
            {
                "step": f"link {height}x{width}",
                "fast_ms": 1e3 * fast_link,
                "naive_ms": 1e3 * naive_link,
                "speedup": naive_link / fast_link,
                "trajectories": int(len(lengths)),
                "mean_len": float(lengths.mean()),
                "max_len": int(lengths[0]),
                "padding": 1.0 - float(lengths.sum()) / grid.index.numel(),
                "bucket_cost": bucket_cost / padded_cost,
                "same_partition": same,
            }
        )

    fast_resize = best_time(lambda: flow.resized_many(grids), repeat=args.repeat)
    naive_resize = best_time(lambda: [flow.resized(h, w) for h, w in grids], repeat=args.repeat)
    fast_total = best_time(lambda: build_trajectories(flow, grids), repeat=args.repeat)
    start = time.perf_counter()
    for height, width in grids:
        naive_trajectories(flow, height, width)
    naive_total = time.perf_counter() - start
    rows += [
        {
            "step": "link, all grids",
            "fast_ms": 1e3 * fast_links,
            "naive_ms": 1e3 * naive_links,
            "speedup": naive_links / fast_links,
        },
        {
            "step": "resample flow to grids",
            "fast_ms": 1e3 * fast_resize,
            "naive_ms": 1e3 * naive_resize,
            "speedup": naive_resize / fast_resize,
        },
        {
            "step": "end to end",
            "fast_ms": 1e3 * fast_total,
            "naive_ms": 1e3 * naive_total,
            "speedup": naive_total / fast_total,
            "same_partition": all(row["same_partition"] for row in rows),
        },
    ]
    print(
        f"flow (DIS medium, fwd + bwd + occlusion, {args.frames - 1} pairs, computed once): {flow_seconds:.2f} s\n"
        f"build_trajectories(flow, {grids}): {1e3 * fast_total:.1f} ms; "
        f"naive_trajectories per grid: {1e3 * naive_total:.0f} ms; speedup {naive_total / fast_total:.1f}x"
    )
    report(
        "trajectories",
        rows,
        settings={
            "frames": args.frames,
            "size": args.size,
            "grids": grids,
            "repeat": args.repeat,
            "flow_seconds": flow_seconds,
        },
        title=f"trajectories, {args.frames} frames at {args.size}x{args.size} "
        "(fast: build_trajectories; naive: naive_trajectories; link rows: flow already on the grid)",
    )


if __name__ == "__main__":
    main()
