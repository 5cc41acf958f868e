"""`make demo`: the main job (invert, then edit --preset age) on a generated clip with the tiny
random-weight model. Runs offline on a CPU; the output is noise by design.

The clip is made here (ffmpeg's `testsrc2` pattern and a 440 Hz tone) rather than shipped: the demo
must run from an installed package with no test media and no network. The test suite's generator
(`tests/media.py`) has many more options; this one makes exactly the demo's clip."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console


def demo_clip(path: Path, *, width: int = 160, height: int = 96, frames: int = 48, fps: int = 24) -> Path:
    """A moving test pattern with a tone (2 s by default), as H.264/AAC MP4 (written to a unique temporary name, then renamed)."""
    import ffmpeg

    from diffferv_cli.files import atomic_path
    from diffferv_cli.video.io import run_ffmpeg
    from diffferv_cli.video.probe import file_url

    video = ffmpeg.input(f"testsrc2=size={width}x{height}:rate={fps}", f="lavfi").video
    audio = ffmpeg.input(f"sine=frequency=440:sample_rate=44100:duration={frames / fps:.6f}", f="lavfi").audio
    with atomic_path(path) as temp:
        run_ffmpeg(ffmpeg.output(video, audio, file_url(temp), format="mp4", vcodec="libx264", preset="veryfast",
                                 crf=18, pix_fmt="yuv420p", acodec="aac", **{"frames:v": frames}),
                   "make the demo clip")
    return path


def main(argv: list[str] | None = None) -> int:
    from diffferv_cli.cli import app

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("demo-out"))
    args = parser.parse_args(argv)
    console = Console()
    args.out.mkdir(parents=True, exist_ok=True)
    clip = demo_clip(args.out / "clip.mp4")
    common = [str(clip), "--model", "tiny-random", "--size", "96", "--steps", "5", "--cache-dir",
              str(args.out / "cache"), "--device", "cpu"]
    console.rule("diffferv demo: tiny random-weight model")
    console.print("[yellow]The tiny model has RANDOM weights: the pipeline runs end to end, but the edit is "
                  "noise, not a meaningful change. Use --model with real SD1.5 weights for real edits. The "
                  "clip is a test pattern, so diffferv also warns that it holds no face.[/yellow]")
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
