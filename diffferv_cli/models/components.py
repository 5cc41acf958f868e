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
    # SDXL's second text encoder (transformers.CLIPTextModelWithProjection) and its tokenizer; None for SD 1.x/2.x
    text_encoder_2: Any = None
    tokenizer_2: Any = None
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
    def is_sdxl(self) -> bool:
        """Two text encoders, a pooled text embedding and size/crop time ids (UNet `addition_embed_type`)."""
        return self.unet.config.get("addition_embed_type") == "text_time"

    @property
    def text_encoders(self) -> tuple:
        return (self.text_encoder,) if self.text_encoder_2 is None else (self.text_encoder, self.text_encoder_2)

    @property
    def native_size(self) -> int:
        """The short side the model was trained at: the UNet's sample size times the VAE's factor (512 for
        SD 1.x, 768 for SD 2.x 768-v, 1024 for SDXL)."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

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
        for module in (self.unet, self.vae, *self.text_encoders):
            module.to(device=device, dtype=dtype)
        if self.is_sdxl and self.vae.config.get("force_upcast") and self.vae.dtype == torch.float16:
            self.vae.to(dtype=torch.float32)  # SDXL's VAE overflows in fp16 (diffusers' pipelines upcast it too)
        return self
