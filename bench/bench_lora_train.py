"""Training step of the specialization stage: a LoRA (`train --lora-rank`) against full fine-tuning.

    python bench/bench_lora_train.py                                   # tiny model, then full-size SD1.5 at 256
    python bench/bench_lora_train.py --models tiny --steps 10
    python bench/bench_lora_train.py --models full --resolution 512 --device cuda

Random weights (models/tiny.py: the tiny model and the full-size SD1.5 architecture): real cost, no
download. One step is what `training.loop` runs per micro-batch: the eq. 4 loss (`_diffusion_loss`: VAE
encode and text encoder under no_grad, UNet forward), backward, Adam step; the LoRA is the one
`train --lora-rank` adds (`models.lora.add_trainable_lora`, attention projections, rank --rank), the
full fine-tune trains every UNet parameter. All float32, no autocast.

Each (model, mode) runs in its own process, so one's memory does not hide in the other's. Figures: the
median seconds per step after one warm-up step, wall clock and process CPU time (on a shared machine
read the CPU column: other processes barely disturb it); the peak memory the steps add over the memory held
before the first step (model, adapter, empty optimizer): on CUDA `torch.cuda.max_memory_allocated`, on
the CPU the process's resident set, sampled every 5 ms by a thread (glibc may keep freed blocks, so it
is an upper bound of what the step needs). No assertion: it only reports.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import report  # noqa: E402

MIB = 2**20


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakRss:
    """Highest resident set size seen while the block runs (a sampling thread, every 2 ms)."""

    def __enter__(self):
        self.peak, self._stop = _rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.005)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def child(settings: dict) -> dict:
    """One (model, mode): build, set up as the training loop does, time `steps` steps, measure memory."""
    import torch

    from diffferv_cli.models.lora import add_trainable_lora
    from diffferv_cli.models.tiny import build_full_size_random, build_tiny_random
    from diffferv_cli.training.loop import _diffusion_loss

    torch.set_num_threads(settings["threads"])
    device = torch.device(settings["device"])
    comps = (build_tiny_random if settings["model"] == "tiny" else build_full_size_random)()
    comps.vae.to(device).eval().requires_grad_(False)
    comps.text_encoder.to(device).eval().requires_grad_(False)
    unet = comps.unet
    if settings["mode"] == "lora":
        trained = add_trainable_lora(unet, settings["rank"], seed=0)
    else:
        unet.requires_grad_(True)
        trained = list(unet.parameters())
    unet.to(device).train()
    if settings["gradient_checkpointing"]:
        unet.enable_gradient_checkpointing()
    optimizer = torch.optim.Adam(trained, lr=1e-5)
    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler.from_config(comps.scheduler_config)
    resolution, batch = settings["resolution"], settings["batch"]
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(batch, 3, resolution, resolution, generator=generator) * 2 - 1  # (batch, 3, R, R)
    example = {"pixels": pixels, "captions": ["a photo of a person"] * batch}
    scaling = float(getattr(comps.vae.config, "scaling_factor", 0.18215))

    def step() -> None:
        loss = _diffusion_loss(example, unet, comps.vae, comps.text_encoder, comps.tokenizer, noise_scheduler,
                               scaling, torch.float32, device, generator)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    times, cpu_times = [], []
    with _PeakRss() as rss:
        before_rss = _rss_bytes()
        for _ in range(settings["steps"] + 1):  # the first one warms up (and creates Adam's state)
            start, start_cpu = time.perf_counter(), time.process_time()
            step()
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - start_cpu)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - before
        kind = "CUDA max_memory_allocated"
    else:
        peak, kind = rss.peak - before_rss, "peak RSS"
    return {"step_s": statistics.median(times[1:]), "step_cpu_s": statistics.median(cpu_times[1:]),
            "first_step_s": times[0], "peak_added_mib": peak / MIB,
            "memory": kind, "trained_params_m": sum(p.numel() for p in trained) / 1e6,
            "unet_params_m": sum(p.numel() for p in unet.parameters()) / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,full", help="tiny, full or both (comma-separated)")
    parser.add_argument("--resolution", type=int, default=None, help="image side (default: 32 tiny, 256 full)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on the CPU")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    rows = []
    for model in args.models.split(","):
        resolution = args.resolution or (32 if model == "tiny" else 256)
        figures = {}
        for mode in ("full", "lora"):
            settings = dict(model=model, mode=mode, resolution=resolution, batch=args.batch, steps=args.steps,
                            rank=args.rank, device=args.device, threads=args.threads,
                            gradient_checkpointing=args.gradient_checkpointing)
            run = subprocess.run([sys.executable, __file__, "--child", json.dumps(settings)], capture_output=True,
                                 text=True)
            if run.returncode != 0:
                print(run.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{model} {mode}: the child process failed (exit {run.returncode})")
            figures[mode] = json.loads(run.stdout.strip().splitlines()[-1])
        for mode in ("full", "lora"):
            value = figures[mode]
            rows.append({"model": f"{model} @ {resolution}px x{args.batch}", "mode": mode if mode == "full" else
                         f"lora r={args.rank}", "trained params (M)": value["trained_params_m"],
                         "step (s)": value["step_s"], "step CPU (s)": value["step_cpu_s"],
                         "first step (s)": value["first_step_s"],
                         "peak added (MiB)": value["peak_added_mib"],
                         "step vs full": value["step_s"] / figures["full"]["step_s"],
                         "memory vs full": value["peak_added_mib"] / max(figures["full"]["peak_added_mib"], 1e-9),
                         "memory measure": value["memory"]})
    report("lora_train_" + args.models.replace(",", "_"), rows, settings=vars(args), title="Training step: LoRA vs full fine-tuning")


if __name__ == "__main__":
    main()
