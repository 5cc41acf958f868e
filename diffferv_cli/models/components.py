"""The result type of every model loader: the modules of one Stable Diffusion model and what identifies it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Components:
    """The modules of a Stable Diffusion model, frozen for inference unless training, with its scheduler
    config as `DDIMScheduler` arguments (models/families.py)."""

    unet: Any  # diffusers.UNet2DConditionModel
    vae: Any  # diffusers.AutoencoderKL
    text_encoder: Any  # transformers.CLIPTextModel
    tokenizer: Any  # transformers.CLIPTokenizer
    scheduler_config: dict
    model_id: str
    fingerprint: str  # identifies the weights; part of every cache key
    is_random: bool = False
    clip_skip: int | None = None  # text encoder layers skipped from the end (diffusers' clip_skip)
    loras: tuple[tuple[str, float], ...] = ()  # (sha256 of the file, scale) of each LoRA fused in (models/lora.py)

    @property
    def identity(self) -> dict:
        """What makes this model compute what it computes, for cache keys: the weights' fingerprint, and
        the schedule, text-encoder layer and fused LoRAs only when they are not the defaults (so that
        keys made before they were part of them stay valid)."""
        from diffferv_cli.models.families import key_of

        identity: dict = {"model": self.fingerprint}
        scheduler = key_of(self.scheduler_config)
        if scheduler is not None:
            identity["scheduler"] = scheduler
        if self.clip_skip:
            identity["clip_skip"] = self.clip_skip
        if self.loras:
            identity["loras"] = [[sha256, scale] for sha256, scale in self.loras]
        return identity

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def label(self) -> str:
        if self.is_random:
            return f"{self.model_id} (RANDOM WEIGHTS: output is noise, not a meaningful edit)"
        return self.model_id

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Components:
        for module in (self.unet, self.vae, self.text_encoder):
            module.to(device=device, dtype=dtype)
        return self
