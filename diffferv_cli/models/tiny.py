"""Stable-Diffusion-shaped models with random weights, built offline: `tiny-random` (tests, the demo) and
the full-size SD1.5 architecture (benchmarks: real cost, no download). Their output is noise and they are
always labelled as such."""

from __future__ import annotations

import torch

from diffferv_cli.models.components import Components
from diffferv_cli.models.families import SD15_SCHEDULER

TINY_RANDOM = "tiny-random"


def _byte_vocab() -> dict[str, int]:
    """CLIP's byte-to-unicode alphabet, each character alone and as a word end: every text tokenizes."""
    from diffferv_cli.models.skeletons import bytes_to_unicode

    alphabet = sorted(bytes_to_unicode().values(), key=ord)
    vocab: dict[str, int] = {}
    for suffix in ("", "</w>"):
        for char in alphabet:
            vocab[char + suffix] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab


def build_tiny_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=_byte_vocab(), merges=[], model_max_length=77)


def build_tiny_random(seed: int = 0) -> Components:
    """An SD1.5-shaped model with random weights (UNet (32, 64) channels, 2 attention grids; VAE /8;
    CLIP text hidden 32). Deterministic for a seed; builds in well under a second."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=8,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 16, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=64,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=37,
                num_attention_heads=4,
                num_hidden_layers=2,
                max_position_embeddings=77,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    for module in (unet, vae, text_encoder):
        module.eval().requires_grad_(False)
    return Components(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler_config=dict(SD15_SCHEDULER),
        model_id=TINY_RANDOM,
        fingerprint=f"{TINY_RANDOM}-v1-seed{seed}",
        is_random=True,
    )


# Stable Diffusion 1.5's UNet (the diffusers defaults fill in the rest: 4 channels in and out, 2 layers
# per block, CrossAttnDownBlock2D x3 + DownBlock2D, ...).
SD15_UNET_CONFIG = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                        block_out_channels=(320, 640, 1280, 1280))


def build_full_size_random(seed: int = 0) -> Components:
    """Full-size SD1.5 architecture with random weights (for benchmarks: real cost, no download).
    Uses the real CLIP tokenizer shape only through the tiny byte tokenizer."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            latent_channels=4,
            sample_size=512,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072,
                           num_attention_heads=12, num_hidden_layers=12, max_position_embeddings=77)
        )
    for module in (unet, vae, text_encoder):
        module.eval().requires_grad_(False)
    return Components(unet, vae, text_encoder, tokenizer, dict(SD15_SCHEDULER),
                      model_id="sd15-shaped-random", fingerprint=f"sd15-shaped-random-seed{seed}",
                      is_random=True)


def build_tiny_sdxl(seed: int = 0) -> Components:
    """An SDXL-shaped model with random weights: no attention on the first level (as SDXL), two CLIP text
    encoders (the second with a projection: the pooled embedding), size/crop time ids through
    `addition_embed_type="text_time"`, VAE /8. Deterministic for a seed."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer, tokenizer_2 = build_tiny_tokenizer(), build_tiny_tokenizer()
    text_config = dict(vocab_size=len(tokenizer), intermediate_size=37, num_attention_heads=4, num_hidden_layers=3,
                       max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 4), use_linear_projection=True,
            cross_attention_dim=32 + 16, addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 16, norm_num_groups=8,
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 16, 16), layers_per_block=1,
            latent_channels=4, norm_num_groups=8, sample_size=64, scaling_factor=0.13025, force_upcast=True,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=32, **text_config))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=16, projection_dim=16, **text_config))
    for module in (unet, vae, text_encoder, text_encoder_2):
        module.eval().requires_grad_(False)
    scheduler = dict(SD15_SCHEDULER, timestep_spacing="leading")  # SDXL base's schedule
    return Components(unet, vae, text_encoder, tokenizer, scheduler, model_id="tiny-random-sdxl",
                      fingerprint=f"tiny-random-sdxl-v1-seed{seed}", is_random=True,
                      text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)



TINY_MODELS = {TINY_RANDOM: build_tiny_random, "tiny-random-sdxl": build_tiny_sdxl}
# what the working sides must be multiples of: VAE /8 times 2 per UNet down block after the first
TINY_MULTIPLES = {TINY_RANDOM: 16, "tiny-random-sdxl": 32}
