"""What the step loop asks of the host: host syncs and torch calls per UNet call, time per call (eager and
torch.compile), inversion and edit steps per second with and without the cache I/O.

    python bench/bench_step_loop.py                        # tiny model, 8 frames, CPU, one thread
    python bench/bench_step_loop.py --no-compile           # skip torch.compile (inductor needs a C++ compiler)
    python bench/bench_step_loop.py --device cuda          # the same figures on a GPU

Tiny random-weight model (the launch-bound regime a GPU sees with the real one: per-call overhead, not
FLOPs, dominates). Calls: the stock UNet (one branch), the temporal UNet for an inversion step (one branch)
and for an edit step in recompute mode (source, negative, positive; appearance, motion and cross maps
injected). Sync points and torch calls come from `diffferv_cli.temporal.counting.CallCounter` (they do not
depend on the device). Times are the best of --repeats after warmup; on the CPU, process CPU seconds.
Steps per second: `invert` / `edit` on a clip generated in memory (`common.synthetic_clip`), timed from the first to the last step report;
"no I/O" runs the same loops with the cache held in memory (CacheEntry's file reads/writes replaced);
the two alternate, best of two each.
No assertion: it only reports.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from common import report  # noqa: E402
from reference_attention import trajectory_set, translating_partition  # noqa: E402

from diffferv_cli.editing.features import FeatureInjector, InjectionSchedule  # noqa: E402
from diffferv_cli.editing.prompts import token_alignment  # noqa: E402
from diffferv_cli.temporal import AttentionContext, temporal_attention  # noqa: E402
from diffferv_cli.temporal.counting import CallCounter  # noqa: E402

SOURCE, EDITED = "a photo of a person", "a photo of an old person"


def calls(components, frames: int, latent: tuple[int, int], device: torch.device):
    """name -> (branches, ctx or None) for the three UNet calls measured."""
    trajectories = trajectory_set(latent, len(components.unet.config.block_out_channels), frames,
                                  lambda h, w, f: translating_partition(h, w, f, (0.3 * h / latent[0], 0.5 * w / latent[1])))
    trajectories = trajectories.to(device)
    branches = ("source", "negative", "positive")
    maps = {"negative": token_alignment(components.tokenizer, SOURCE, SOURCE),
            "positive": token_alignment(components.tokenizer, SOURCE, EDITED)}
    injector = FeatureInjector(InjectionSchedule(50), branches, ("negative", "positive"), maps, device=device)
    inversion = AttentionContext(frames=frames, branches=("source",), latent_size=latent, trajectories=trajectories)
    edit = AttentionContext(frames=frames, branches=branches, latent_size=latent, trajectories=trajectories,
                            control=injector.at_step(0))
    return {"stock": (1, None), "inversion": (1, inversion), "edit": (3, edit)}


def per_call(components, frames, latent, device, repeats: int, compile_unet: bool):
    unet = components.unet
    generator = torch.Generator().manual_seed(0)
    timestep = torch.tensor(500, device=device)
    rows = {}
    stock_calls = stock_time = None
    with temporal_attention(unet), torch.inference_mode():
        for name, (branches, ctx) in calls(components, frames, latent, device).items():
            latents = torch.randn(branches * frames, 4, *latent, generator=generator).to(device)
            text = torch.randn(branches * frames, 77, unet.config.cross_attention_dim, generator=generator).to(device)
            kwargs = {"cross_attention_kwargs": {"ctx": ctx}} if ctx is not None else {}
            # the stock UNet: the diffusers processors, as without `temporal_attention`
            processors = None
            if ctx is None:
                processors = dict(unet.attn_processors)
                from diffusers.models.attention_processor import AttnProcessor2_0
                unet.set_attn_processor(AttnProcessor2_0())
            try:
                unet(latents, timestep, text, **kwargs)
                with CallCounter() as counter:
                    unet(latents, timestep, text, **kwargs)
                timings = {"eager": timed(lambda a=latents, b=text, k=kwargs: unet(a, timestep, b, **k), repeats, device)}
                if compile_unet:
                    torch._dynamo.reset()
                    compiled = torch.compile(unet, dynamic=False)
                    timings["compiled"] = timed(lambda c=compiled, a=latents, b=text, k=kwargs: c(a, timestep, b, **k),
                                                repeats, device,
                                                warmup=2)
            finally:
                if processors is not None:
                    unet.set_attn_processor(processors)
            if name == "stock":
                stock_calls, stock_time = counter.torch_calls, timings
            rows[name] = {"syncs": counter.syncs, "torch calls": counter.torch_calls,
                          "calls ratio": counter.torch_calls / stock_calls,
                          **{f"{mode} s": seconds for mode, seconds in timings.items()},
                          **{f"{mode} ratio": seconds / stock_time[mode] for mode, seconds in timings.items()}}
    return rows


def timed(fn, repeats: int, device: torch.device, warmup: int = 1) -> float:
    """Best of `repeats` calls after `warmup`: process CPU seconds on the CPU, wall seconds on a GPU."""
    clock = time.process_time if device.type == "cpu" else time.perf_counter
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = clock()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, clock() - start)
    return best


class _InMemory:
    """Replaces CacheEntry's file reads and writes with a dict (the loops' work without the cache I/O)."""

    def __init__(self):
        from diffferv_cli.editing.cache import CacheEntry

        self.cls, self.files = CacheEntry, {}
        self.saved = (CacheEntry._write_tensors, CacheEntry._read_tensors, CacheEntry.save_manifest,
                      CacheEntry.make_durable)

    def __enter__(self):
        files = self.files

        def write(entry, relative, tensors, durable=True):
            files[relative] = {name: tensor.detach().cpu().clone() for name, tensor in tensors.items()}
            entry.manifest.setdefault("files", {})[relative] = "in memory"

        self.cls._write_tensors = write
        self.cls._read_tensors = lambda entry, relative: files[relative]
        self.cls.save_manifest = lambda entry, durable=True: None
        self.cls.make_durable = lambda entry, relatives: None
        return self

    def __exit__(self, *exc):
        (self.cls._write_tensors, self.cls._read_tensors, self.cls.save_manifest,
         self.cls.make_durable) = self.saved


def steps_per_second(components, frames: int, size: int, steps: int, work: Path) -> dict[str, dict[str, float]]:
    from common import synthetic_clip

    from diffferv_cli.config import EditConfig, InversionConfig
    from diffferv_cli.editing.inversion import invert
    from diffferv_cli.editing.sampling import edit

    clip = synthetic_clip(frames, size, size, multiple=16)
    config = InversionConfig(steps=steps, flow_preset="ultrafast")
    results: dict[str, dict[str, float]] = {"inversion": {}, "edit": {}}

    def rate(stage, run):
        marks = []
        run(lambda name, done, total: marks.append(time.perf_counter()) if name.startswith(stage) and done else None)
        return (len(marks) - 1) / (marks[-1] - marks[0])

    runs = [("no I/O", _InMemory()), ("with cache I/O", None)] * 2  # alternated, best of two each
    for number, (label, io) in enumerate(runs):
        cache = work / f"{number}-{label.replace(' ', '-').replace('/', '')}"
        if io is not None:
            io.__enter__()
        try:
            outcome = []
            inverted = rate("invert", lambda p, cache=cache, outcome=outcome: outcome.append(
                invert(components, clip, config, cache_dir=cache, progress=p)))
            results["inversion"][label] = max(inverted, results["inversion"].get(label, 0.0))
            entry = outcome[0].entry
            edit_config = EditConfig(prompt_edit=EDITED)
            edited = rate("edit", lambda p, entry=entry, edit_config=edit_config: edit(components, entry, edit_config,
                                                                                      progress=p))
            results["edit"][label] = max(edited, results["edit"].get(label, 0.0))
        finally:
            if io is not None:
                io.__exit__()
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=128, help="frame side in pixels (latent = size / 8)")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps of the steps-per-second runs")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile timings")
    parser.add_argument("--calls-only", action="store_true", help="only the per-call figures (no steps/s runs)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    from diffferv_cli.models.loading import load_components

    components = load_components("tiny-random", device=args.device, dtype="fp32")
    latent = (args.size // 8, args.size // 8)
    rows = []
    measured = per_call(components, args.frames, latent, device, args.repeats, not args.no_compile)
    for name, values in measured.items():
        rows.append({"figure": f"{name} UNet call: host syncs", "value": values["syncs"],
                     "goal": "0" if name != "stock" else ""})
        rows.append({"figure": f"{name} UNet call: torch calls", "value": f"{values['torch calls']} "
                     f"({values['calls ratio']:.2f}x stock)", "goal": "<= 1.3x stock" if name != "stock" else ""})
        for mode in ("eager", "compiled"):
            if f"{mode} s" in values:
                rows.append({"figure": f"{name} UNet call: {mode} s", "value": f"{values[f'{mode} s'] * 1e3:.1f} ms "
                             f"({values[f'{mode} ratio']:.2f}x stock {mode})",
                             "goal": "<= 1.3x stock" if name == "inversion" else ""})
    rates = {}
    if not args.calls_only:
        with tempfile.TemporaryDirectory() as work:
            rates = steps_per_second(components, args.frames, args.size, args.steps, Path(work))
    for loop, by_io in rates.items():
        hidden = by_io["with cache I/O"] / by_io["no I/O"]
        rows.append({"figure": f"{loop} steps/s with cache I/O / without", "value":
                     f"{by_io['with cache I/O']:.2f} / {by_io['no I/O']:.2f} = {hidden:.3f}", "goal": ">= 0.95"})
    for row in rows:
        print(f"{row['figure']}: {row['value']}" + (f" (goal {row['goal']})" if row["goal"] else ""), flush=True)
    settings = {**vars(args), "latent": latent, "model": "tiny-random", "device": str(device)}
    report("step_loop", rows, settings, title="Step loop: host syncs, torch calls, time per UNet call, I/O hidden")


if __name__ == "__main__":
    main()
