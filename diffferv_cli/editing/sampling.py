"""Edit sampling with preservation-feature injection (paper 3.4, "Sampling with Preservation Feature
Injection"), one batched UNet call per step.

Branches of the batch (each `frames` rows, see attention/context.py):

    source    recompute mode only: fed z_{T-1-k}, the latent the inversion fed to the UNet at this very
              timestep, with the source prompt; its SWCFA/TTA Q,K and cross-attention maps are therefore
              the inversion's preservation features, regenerated instead of read from disk
    anchor    --exact only: fed the inversion latent z_{T-k} with the source prompt, features injected;
              left out when the edit prompt is the source prompt (a reconstruction): the negative branch is
              then the anchor itself (same prompt, same latent at every step, see below)
    negative  the edit latent x with the source prompt (the paper's negative-prompt scheme), injected
    positive  the edit latent x with the edit prompt, injected (left out when both prompts are equal)

    step k (timestep t, T - k in the paper's units):
        eps    = eps_neg + g * (eps_pos - eps_neg)
        x     <- DDIM(eps, t, x)
        exact:  x <- z_{T-1-k} + (DDIM(eps, t, x) - DDIM(eps_anchor, t, z_{T-k}))

Every UNet pass runs over the temporal windows the inversion used (recorded in the cache request; see
temporal/windows.py): each window's batch holds the branches x the window's frames, and the windows'
noise predictions are blended per branch before the guidance and the DDIM step. In disk mode the source
branch is absent and its features come from the cache's feature files of the same step and window. The
exact correction adds, per step, the error the source prompt's injected prediction makes along the cached
inversion path; with the edit prompt equal to the source prompt the edit path then lands on z_0 exactly.
That holds by construction, not by luck of the kernels: x starts at z_T, and as long as x equals the
anchor's latent the negative branch computes what the anchor would, so the negative branch's own
prediction serves as the anchor's and the bracket is a value minus itself, zero, whatever the hardware.
(Two branches of one batch need not give the same bits for the same input: a GEMM may treat the rows of
a tile edge with another micro-kernel, as MKL does on AVX2 CPUs.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DDIMScheduler

from diffferv_cli.config import EditConfig
from diffferv_cli.editing.cache import CacheEntry
from diffferv_cli.editing.features import FeatureInjector, InjectionSchedule
from diffferv_cli.editing.inversion import unet_for_loop, window_plan
from diffferv_cli.editing.prefetch import FeatureStream, LatentStream
from diffferv_cli.editing.prompts import encode_conditioning, repeat_rows, token_alignment_all
from diffferv_cli.editing.vae import decode_latents
from diffferv_cli.errors import UserError
from diffferv_cli.temporal.install import temporal_attention

Progress = Callable[[str, int, int], None] | None


@dataclass
class EditResult:
    latents: torch.Tensor  # (m, 4, h, w) float32, the final x_0
    frames: np.ndarray | None  # (m, H, W, 3) uint8 at working size; None when not decoded (decode=False)
    branches: tuple[str, ...]


def branch_layout(config: EditConfig, source_prompt: str, feature_mode: str) -> tuple[str, ...]:
    branches: list[str] = []
    if config.inject and feature_mode == "recompute":
        branches.append("source")
    if config.exact and config.prompt_edit != source_prompt:  # else the negative branch is the anchor
        branches.append("anchor")
    branches.append("negative")
    if config.prompt_edit != source_prompt:
        branches.append("positive")
    return tuple(branches)


def edit(components, entry: CacheEntry, config: EditConfig, *, feature_mode: str = "recompute",
         progress: Progress = None, decode: bool = True, compile_unet: bool = False) -> EditResult:
    """Sample the edit from the cached inversion in `entry` and, with `decode`, decode it to frames (a
    writer that streams them decodes `latents` with `vae.decoded_frames` instead).

    The step loop keeps every latent on the device; the cached latents (and disk-mode features) are read
    ahead of it in a background thread, each file once (editing/prefetch.py). `compile_unet`: run the UNet
    through `torch.compile`."""
    report = progress or (lambda stage, done, total: None)
    request = entry.manifest["request"]
    source_prompt, steps = request["prompt"], int(request["steps"])
    if not entry.complete:
        raise UserError(f"The inversion in {entry.folder} is unfinished; run `diffferv invert` again to resume it.")
    if feature_mode == "disk" and config.inject and not entry.has_features:
        raise UserError("This inversion was cached without features; run `diffferv invert --features disk` first.")
    branches = branch_layout(config, source_prompt, feature_mode)
    prompts = {"source": source_prompt, "anchor": source_prompt, "negative": source_prompt,
               "positive": config.prompt_edit}
    pixels = tuple(side * components.vae_scale_factor for side in entry.manifest["latent_size"])  # (height, width)
    embeddings, added = encode_conditioning(components, [prompts[name] for name in branches], pixels)  # (branches, 77, hidden)

    device = components.device
    injector = None
    if config.inject:
        schedule = InjectionSchedule(steps, config.tau_app, config.tau_motion, config.tau_cross)
        targets = tuple(name for name in branches if name != "source")
        token_maps = {name: token_alignment_all(components, source_prompt, prompts[name]) for name in targets}
        injector = FeatureInjector(schedule, branches, targets, token_maps,
                                   source_branch="source" if feature_mode == "recompute" else None, device=device)

    scheduler = DDIMScheduler.from_config(components.scheduler_config)
    scheduler.set_timesteps(steps)
    inversion_timesteps = entry.manifest["timesteps"]
    timesteps = [int(t) for t in scheduler.timesteps]
    if timesteps != inversion_timesteps[::-1]:
        raise UserError(f"The cache at {entry.folder} was inverted with other timesteps; rerun with --force.")
    timestep_inputs = scheduler.timesteps.to(device)  # the UNet's timestep, read as a view per step
    plan = window_plan(entry, components, branches)
    extras = {window.frames: repeat_rows(added, window.frames) for window in plan.windows}  # SDXL's, per row
    texts = {window.frames: embeddings.repeat_interleave(window.frames, dim=0)  # (branches*L, 77, hidden)
             for window in plan.windows}
    predicted = tuple(name for name in branches if name != "source")  # the source branch only gives features
    stage = f"edit: {plan.passes(steps)}"
    total, done = steps * plan.frames_per_pass, 0
    report(stage, 0, total)
    # cached latents in the order the loop asks for them: z_T, then per step k (inversion step s = T-1-k)
    # the anchor's z_{s+1}, and z_s once for the source branch and once for the exact correction (every
    # request listed, so that a latent stays on the device until its last use and is read once)
    source_reads = ("source" in branches) + bool(config.exact)
    order = [steps] + [index for k in range(steps) for index in
                       ([steps - k] if "anchor" in branches else []) + [steps - 1 - k] * source_reads]
    disk_features = injector is not None and feature_mode == "disk"
    feature_order = [(steps - 1 - k, index) for k in range(steps) for index in range(len(plan.windows))]
    unet = unet_for_loop(components.unet, compile_unet)
    with temporal_attention(components.unet), torch.inference_mode(), \
            LatentStream(entry, order, device) as cached, \
            FeatureStream(entry, feature_order if disk_features else [], device) as stored:
        x = cached(steps)  # z_T, float32 (m, 4, h, w), on the device from here on
        for k, timestep in enumerate(timesteps):
            inversion_step = steps - 1 - k  # the inversion step that ran at this timestep
            cached_index = {"source": inversion_step, "anchor": inversion_step + 1}  # branches fed from the cache
            latents_in = {name: cached(cached_index[name]) if name in cached_index else x for name in branches}
            blends = {name: plan.blend(tuple(x.shape[1:])) for name in predicted}
            for index, (window, context) in enumerate(zip(plan.windows, plan.contexts, strict=True)):
                control = None
                if injector is not None:
                    control = injector.at_step(k, stored(inversion_step, index) if disk_features else None)
                batch = torch.cat([latents_in[name][window.slice] for name in branches])  # (branches*L, 4, h, w)
                ctx = context.at_step(k, timestep, control=control)
                noise = unet(batch.to(components.dtype), timestep_inputs[k], encoder_hidden_states=texts[window.frames],
                             added_cond_kwargs=extras[window.frames],
                             cross_attention_kwargs={"ctx": ctx}).sample
                for name, window_noise in zip(branches, noise.chunk(len(branches)), strict=True):
                    if name in blends:
                        blends[name].add(index, window_noise)
                done += window.frames
                report(stage, done, total)
            eps = {name: blended.result for name, blended in blends.items()}
            guided = eps["negative"]
            if "positive" in eps:
                guided = eps["negative"] + config.guidance * (eps["positive"] - eps["negative"])  # CFG
            x_next = scheduler.step(guided, timestep, x).prev_sample
            if config.exact:
                anchor = "anchor" if "anchor" in branches else "negative"  # module notes: a reconstruction
                on_path = scheduler.step(eps[anchor], timestep, latents_in[anchor]).prev_sample
                # z + (edit step - anchor step): when the edit path is on the inversion path the bracket
                # is exactly zero, so reconstruction lands on the cached latents bit for bit
                x_next = cached(inversion_step) + (x_next - on_path)
            x = x_next
    x = x.cpu()  # the edit leaves the device once, at the end
    frames_out = decode_latents(components.vae, x, progress=lambda d, t: report("decode", d, t)) if decode else None
    return EditResult(latents=x, frames=frames_out, branches=branches)
