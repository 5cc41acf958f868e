"""Output at source resolution: residual compositing against the working render scaled up (`replace`).

    python bench/bench_composite.py                       # 1080p clip, 4 frames, tiny model, plus one SD1.5 UNet call
    python bench/bench_composite.py --no-unet             # skip the full-size UNet timing (needs ~4 GB, ~1 min)

1. Reconstruction at source resolution: a 1920x1080 `testsrc2` clip is inverted and reconstructed with
   `--exact` by the tiny random-weight model at working size 512 (short side), then written back to
   1080p both ways; PSNR / SSIM against the source frames (`run_reconstruction`'s source-resolution
   metrics). Goal: residual >= replace + 20 dB. The tiny model's VAE is random, so its round trip is
   noise and `replace` scores like noise; the row "replace, perfect VAE" scales up the working frames
   themselves (R = E = the input at working size), the best `replace` can ever do on this clip.
2. Compositing time per 1080p frame (CPU seconds, one OpenCV thread, best of --repeat): the residual
   rule with a face-sized changed area (the mask has work to do) and with no change, `replace`, and a
   face region; plus ffmpeg decoding one 1080p source frame (wall time: it runs in its own process).
   Goal: under 5 % of the edit's time per frame at 512x512. The edit's time is bounded below by ONE
   UNet call of the full-size SD1.5 architecture on one frame's three branches (source, negative,
   positive) at 512x512, stock attention, one thread, measured here; the real edit runs T = 50 of them
   plus a VAE decode, so the share of the whole edit is 50x smaller than the share of one call.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import make_test_clip, report  # noqa: E402


def cpu_time(fn, repeat: int) -> float:
    """Fastest process CPU seconds of `repeat` calls after one warmup."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


def unet_call_seconds() -> float:
    """CPU seconds of one full-size SD1.5 UNet call, batch 3 (one frame's branches), 512x512, 1 thread."""
    import torch

    from diffferv_cli.models.tiny import build_full_size_random

    unet = build_full_size_random().unet
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(3, 4, 64, 64, generator=generator)
    text = torch.randn(3, 77, 768, generator=generator)
    with torch.inference_mode():
        return cpu_time(lambda: unet(latents, 500, text), repeat=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=1920)
    parser.add_argument("--height", type=int, default=1080)
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4, help="DDIM steps of the tiny model's inversion")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--no-unet", action="store_true", help="skip timing the full-size UNet call")
    args = parser.parse_args()

    import cv2
    import torch

    torch.set_num_threads(1)
    cv2.setNumThreads(1)

    from diffferv_cli.config import ClipSpec, CompositeConfig, EditConfig, InversionConfig
    from diffferv_cli.editing.composite import composite_frame
    from diffferv_cli.editing.job import run_reconstruction, source_resolution_metrics
    from diffferv_cli.models.tiny import build_tiny_random
    from diffferv_cli.video.geometry import working_geometry
    from diffferv_cli.video.io import read_clip
    from diffferv_cli.video.stream import stream_frames

    columns = ("PSNR dB", "SSIM", "ms", "% of one UNet call", "% of a 50-step edit", "goal")

    def row(figure: str, values: dict) -> dict:  # every row has every column (the table takes the first's)
        return {"figure": figure, **{column: values.get(column) for column in columns}}

    rows = []
    size = f"{args.width}x{args.height}"
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        video = make_test_clip(work / "clip.mp4", width=args.width, height=args.height, frames=args.frames, fps=24)
        clip = read_clip(video, ClipSpec(short_side=512, multiple=16))
        components = build_tiny_random()
        inversion = InversionConfig(steps=args.steps, flow_preset="ultrafast")
        _, reconstruction = run_reconstruction(components, clip, inversion,
                                               EditConfig(prompt_edit=inversion.prompt, exact=True))
        metrics = reconstruction.source_metrics
        perfect = source_resolution_metrics(clip, {"replace": (clip.frames, CompositeConfig(mode="replace"))}, None)
        residual, replace = metrics["exact, residual"], metrics["exact, replace"]
        for label, values in (("replace (tiny model's random VAE)", replace),
                              ("replace, perfect VAE (the working frames scaled up)", perfect["replace"]),
                              ("residual (PSNR capped at 100)", residual)):
            rows.append(row(f"reconstruction at {size}, --exact: {label}",
                            {"PSNR dB": values["psnr"], "SSIM": values["ssim"]}))
        rows.append(row(f"reconstruction at {size}: residual - replace (dB)",
                        {"PSNR dB": residual["psnr"] - replace["psnr"], "goal": ">= 20 dB"}))

        # compositing time per frame
        geometry = clip.geometry
        source = next(stream_frames(video, clip.frame_indices[:1], 1, info=clip.info))
        reference = reconstruction.reference[0]
        edited = reference.copy()
        height, width = edited.shape[:2]
        face = (slice(height // 4, height // 4 + 200), slice(width // 2 - 80, width // 2 + 80))  # ~face-sized
        edited[face] = 255 - edited[face]
        config = CompositeConfig()
        cases = {
            "residual, face-sized change": lambda: composite_frame(source, edited, reference, geometry, config),
            "residual, no change": lambda: composite_frame(source, reference, reference, geometry, config),
            "replace": lambda: composite_frame(source, edited, reference, geometry, CompositeConfig(mode="replace")),
        }
        region = (args.width // 2 - 300, args.height // 2 - 400, 600, 800) if args.height >= 800 else None
        if region:
            region_geometry = working_geometry(region[2:], ClipSpec(short_side=512, multiple=16))
            ww, wh = region_geometry.working_size
            region_edit = np.random.default_rng(0).integers(0, 256, (wh, ww, 3), dtype=np.uint8)
            region_reference = np.random.default_rng(1).integers(0, 256, (wh, ww, 3), dtype=np.uint8)
            cases["residual, 600x800 face region, changed everywhere"] = lambda: composite_frame(
                source, region_edit, region_reference, region_geometry, config, region)
        timings = {label: cpu_time(fn, args.repeat) for label, fn in cases.items()}

        def decode():
            for _ in stream_frames(video, clip.frame_indices, 1, info=clip.info):
                pass

        start = time.perf_counter()
        decode()
        decode_seconds = (time.perf_counter() - start) / len(clip.frame_indices)

    unet = None if args.no_unet else unet_call_seconds()
    for label, seconds in timings.items():
        values = {"ms": seconds * 1000}
        if unet:
            values.update({"% of one UNet call": 100 * seconds / unet, "% of a 50-step edit": 100 * seconds / (50 * unet)})
        if label.startswith("residual, face"):
            values["goal"] = "< 5 % of the edit per frame"
        rows.append(row(f"composite one {size} frame (cpu): {label}", values))
    rows.append(row(f"decode one {size} source frame (ffmpeg, wall)", {"ms": decode_seconds * 1000}))
    if unet:
        rows.append(row("one SD1.5 UNet call: 3 branches of one frame, 512x512, 1 thread (cpu)", {"ms": unet * 1000}))
    settings = {**vars(args), "working_size": list(clip.geometry.working_size), "threads": 1,
                "unet_seconds": unet}
    report("composite", rows, settings, title=f"Source-resolution output at {size}")


if __name__ == "__main__":
    main()
