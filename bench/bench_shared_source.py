"""Several presets of one clip: sampled together with one source branch per UNet call
(`sampling.edit_many`) vs one `edit` per preset, from the same cached inversion. Prints, for k = 1 and 3
presets (age, blond, glasses: their prompts and tau_app), the UNet frame rows per step (a hook on the UNet
counts the batch rows of every call), wall and CPU time of the sampling loops (no decode), and the largest
difference between the two ways' latents.

    python bench/bench_shared_source.py --model tiny --size 64 --frames 8 --steps 10
    python bench/bench_shared_source.py --model full-size --size 128 --frames 4 --steps 2 [--device cuda]

The inversion runs once beforehand (not timed); each way is run once untimed first, then timed
`--repeat` times (the fastest counts), the two ways alternating.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import make_test_clip, report  # noqa: E402

PRESETS = {"age": ("a photo of an old person", 0.9), "blond": ("a photo of a blond person", 0.9),
           "glasses": ("a photo of a person wearing glasses", 0.7)}


class RowCounter:
    def __init__(self, unet):
        self.rows = 0
        self.handle = unet.register_forward_hook(lambda module, args, output: self._add(args[0].shape[0]))

    def _add(self, rows: int) -> None:
        self.rows += rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "full-size"], default="tiny")
    parser.add_argument("--size", type=int, default=64, help="short side of the working frames")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import torch

    from diffferv_cli.config import ClipSpec, EditConfig, InversionConfig
    from diffferv_cli.editing.inversion import invert
    from diffferv_cli.editing.sampling import edit, edit_many
    from diffferv_cli.models.devices import pick_dtype
    from diffferv_cli.models.tiny import build_full_size_random, build_tiny_random
    from diffferv_cli.video.io import read_clip

    device = torch.device(args.device)
    build = build_tiny_random if args.model == "tiny" else build_full_size_random
    components = build(seed=0).to(device, pick_dtype(device))
    multiple = 16 if args.model == "tiny" else 64
    rows = []
    with tempfile.TemporaryDirectory() as work:
        clip_path = make_test_clip(Path(work) / "clip.mp4", width=args.size * 3 // 2, height=args.size,
                                   frames=args.frames, fps=24)
        clip = read_clip(clip_path, ClipSpec(short_side=args.size, multiple=multiple, frames=args.frames))
        entry = invert(components, clip, InversionConfig(steps=args.steps, flow_preset="ultrafast"),
                       cache_dir=Path(work) / "cache").entry
        counter = RowCounter(components.unet)
        for count in (1, 3):
            configs = [EditConfig(prompt_edit=prompt, tau_app=tau) for prompt, tau in list(PRESETS.values())[:count]]
            ways = {"separate": lambda configs=configs: [edit(components, entry, config, decode=False)
                                                         for config in configs],
                    "shared": lambda configs=configs: edit_many(components, entry, configs, decode=False)}
            figures = {name: {"wall": [], "cpu": []} for name in ways}
            latents = {}
            for name, way in ways.items():  # untimed first run: warm-up, and the rows per step
                counter.rows = 0
                latents[name] = [result.latents for result in way()]
                figures[name]["rows"] = counter.rows // args.steps
            for _ in range(args.repeat):
                for name, way in ways.items():
                    wall, cpu = time.perf_counter(), time.process_time()
                    way()
                    figures[name]["wall"].append(time.perf_counter() - wall)
                    figures[name]["cpu"].append(time.process_time() - cpu)
            difference = max(float((a - b).abs().max()) for a, b in zip(latents["shared"], latents["separate"],
                                                                         strict=True))
            for name in ways:
                wall, cpu = min(figures[name]["wall"]), min(figures[name]["cpu"])
                rows.append({"presets": count, "way": name, "UNet frame rows per step": figures[name]["rows"],
                             "branches per step": figures[name]["rows"] // args.frames, "wall s": round(wall, 3),
                             "CPU s": round(cpu, 3),
                             "wall / separate": round(wall / min(figures["separate"]["wall"]), 3),
                             "max |shared - separate|": difference})
        counter.handle.remove()
    report("shared_source", rows, settings=vars(args) | {"working_size": list(clip.geometry.working_size),
                                                        "threads": torch.get_num_threads()},
           title=f"shared source branch, {args.model} model, {args.frames} frames, {args.steps} steps")


if __name__ == "__main__":
    main()
