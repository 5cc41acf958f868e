"""`make demo`: the main job (invert, then edit --preset age) on a generated clip with the tiny
random-weight model. Runs offline in well under a minute on a CPU; the output is noise by design."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console


def main(argv: list[str] | None = None) -> int:
    from diffferv_cli.cli import app
    from diffferv_cli.video.io import make_test_clip

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("demo-out"))
    args = parser.parse_args(argv)
    console = Console()
    args.out.mkdir(parents=True, exist_ok=True)
    clip = make_test_clip(args.out / "clip.mp4", width=160, height=96, frames=8, fps=24, audio=True)
    common = [str(clip), "--model", "tiny-random", "--size", "96", "--steps", "10", "--cache-dir",
              str(args.out / "cache"), "--device", "cpu"]
    console.rule("diffferv demo: tiny random-weight model")
    console.print("[yellow]The tiny model has RANDOM weights: the pipeline runs end to end, but the edit is "
                  "noise, not a meaningful change. Use --model with real SD1.5 weights for real edits.[/yellow]")
    for command in (["invert", *common],
                    ["edit", *common, "--preset", "age", "-o", str(args.out / "clip.age.mp4"), "--overwrite",
                     "--side-by-side"]):
        console.print(f"$ diffferv {' '.join(command)}")
        try:
            app(command, standalone_mode=False)
        except SystemExit as stop:
            if stop.code:
                return int(stop.code)
    console.print(f"Demo outputs in {args.out}/: clip.mp4 (input), clip.age.mp4, clip.age.side-by-side.mp4")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
