"""DDIM inversion of a clip through the temporal UNet, cached on disk (paper 3.4, "Inversion with
Preservation Feature Caching").

    1. flow -> trajectories on every token grid            (cached)
    2. z_0 = VAE latent mean of every frame                 (cached, float32)
    3. for i = 0 .. T-1 (timesteps ascending):
           eps     = UNet(z_i, t_i, source prompt)          guidance 1, SWCFA + TTA
           z_{i+1} = DDIMInverse(eps, t_i, z_i)             (cached after each step: resumable)
       disk feature mode also writes the step's preservation features.

The latent fed to the UNet at step i is exactly z_i, which is what lets editing recompute the features
later instead of storing them (see editing.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import DDIMInverseScheduler

from diffferv_cli.config import InversionConfig
from diffferv_cli.editing.cache import (
    CacheEntry,
    cache_root,
    file_sha256,
    open_entry,
    trajectories_from_tensors,
    trajectories_to_tensors,
)
from diffferv_cli.editing.features import FeatureRecorder
from diffferv_cli.editing.prompts import encode_prompts
from diffferv_cli.editing.vae import encode_frames
from diffferv_cli.temporal.context import AttentionContext
from diffferv_cli.temporal.install import temporal_attention

Progress = Callable[[str, int, int], None] | None


@dataclass
class InversionOutcome:
    entry: CacheEntry
    steps_run: int  # UNet passes this call ran (0 when the cache already held everything)


def cache_request(clip, components, config: InversionConfig, source_sha256: str) -> dict:
    """Everything that determines the inversion's result, and nothing else (feature mode is not in it:
    latents are the same in both modes; disk mode only adds feature files)."""
    request = {
        "source_sha256": source_sha256,
        "selection": {"start": clip.spec.start, "frames": clip.spec.frames, "stride": clip.spec.stride,
                      "indices": list(clip.frame_indices)},
        "working_size": list(clip.geometry.working_size),
        "model": components.fingerprint,
        "unet_dtype": str(components.dtype).removeprefix("torch."),
        "prompt": config.prompt,
        "steps": config.steps,
        "temporal": config.temporal.model_dump(),
        "flow": config.flow_preset,
    }
    if clip.spec.region is not None:  # only when set, so that whole-frame keys stay as they were
        request["region"] = list(clip.spec.region)
    return request


def latent_size(clip, components) -> tuple[int, int]:
    width, height = clip.geometry.working_size
    return height // components.vae_scale_factor, width // components.vae_scale_factor


def attention_levels(unet) -> int:
    return len(unet.config.block_out_channels)


def base_context(entry: CacheEntry, components, frames: int, branches: tuple[str, ...]) -> AttentionContext:
    request = entry.manifest["request"]
    temporal = request["temporal"]
    trajectories = trajectories_from_tensors(entry.read_trajectories(), frames).to(components.device)
    return AttentionContext(frames=frames, branches=branches, latent_size=tuple(entry.manifest["latent_size"]),
                            trajectories=trajectories, window=temporal["window"], swcfa=temporal["swcfa"],
                            tta=temporal["tta"])


def inverse_scheduler(components, steps: int) -> DDIMInverseScheduler:
    scheduler = DDIMInverseScheduler.from_config(components.scheduler_config)
    scheduler.set_timesteps(steps)
    return scheduler


def invert(components, clip, config: InversionConfig, *, cache_dir=None, force: bool = False,
           progress: Progress = None) -> InversionOutcome:
    """Invert `clip` (or resume / reuse its cached inversion) and return the cache entry."""
    from diffferv_cli.temporal.flow import DISFlow, compute_flow
    from diffferv_cli.temporal.trajectories import build_trajectories, token_grids

    report = progress or (lambda stage, done, total: None)
    request = cache_request(clip, components, config, file_sha256(clip.info.path))
    entry = open_entry(cache_root(cache_dir), request, force=force)
    manifest = entry.manifest
    want_features = config.feature_mode == "disk"
    if entry.complete and (entry.has_features or not want_features):
        return InversionOutcome(entry, 0)

    frames = len(clip.frames)
    size = latent_size(clip, components)
    if "trajectories.safetensors" not in manifest["files"]:
        flow = compute_flow(clip.frames, DISFlow(config.flow_preset), progress=lambda d, t: report("flow", d, t))
        grids = token_grids(size, attention_levels(components.unet))
        entry.write_trajectories(trajectories_to_tensors(build_trajectories(flow, grids)))
        manifest.update(latent_size=list(size), frames=frames, geometry=_geometry_dict(clip))
        entry.save_manifest()

    if not manifest.get("encoded"):
        latents = encode_frames(components.vae, clip.frames, progress=lambda d, t: report("encode", d, t))
        entry.write_latent(0, latents)
        manifest.update(encoded=True, finished_steps=0, feature_steps=0, features_stored=False)
        entry.save_manifest()

    start = entry.finished_steps
    if want_features:  # features must cover every step from 0: recompute the missing ones
        start = min(start, int(manifest.get("feature_steps", 0)))
    steps = config.steps
    scheduler = inverse_scheduler(components, steps)
    manifest["timesteps"] = [int(t) for t in scheduler.timesteps]
    text = encode_prompts(components, [config.prompt]).repeat_interleave(frames, dim=0)  # (m, 77, hidden)
    recorder = FeatureRecorder(dtype=components.dtype) if want_features else None
    context = base_context(entry, components, frames, ("source",))
    latent = entry.read_latent(start)  # float32 (m, 4, h, w)
    ran = 0
    with temporal_attention(components.unet), torch.inference_mode():
        for step in range(start, steps):
            timestep = scheduler.timesteps[step]
            if recorder:
                recorder.reset()
            ctx = context.at_step(step, timestep, control=recorder)
            noise = components.unet(latent.to(components.device, components.dtype), timestep,
                                    encoder_hidden_states=text, cross_attention_kwargs={"ctx": ctx}).sample
            if step + 1 <= entry.finished_steps:
                # features added to a finished inversion: keep the cached path, whose latents are the ones
                # recompute mode feeds, so that both modes see the same features
                latent = entry.read_latent(step + 1)
            else:
                latent = scheduler.step(noise.float().cpu(), timestep, latent).prev_sample  # z_{step+1}
                entry.write_latent(step + 1, latent)
            if recorder:
                entry.write_features(step, recorder.features)
                manifest["feature_steps"] = step + 1
            manifest["finished_steps"] = max(entry.finished_steps, step + 1)
            manifest["features_stored"] = int(manifest.get("feature_steps", 0)) >= steps
            entry.save_manifest()
            ran += 1
            report("invert", step + 1, steps)
    return InversionOutcome(entry, ran)


def _geometry_dict(clip) -> dict:
    geometry = clip.geometry
    return {"source_size": list(geometry.source_size), "working_size": list(geometry.working_size),
            "scaled_size": list(geometry.scaled_size), "crop": list(geometry.crop),
            "region": None if clip.spec.region is None else list(clip.spec.region)}
