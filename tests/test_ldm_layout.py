"""Self-check of tests/ldm_layout.py: a small SD1-shaped model written in the LDM single-file layout loads
back through diffusers' own converters with every tensor bit-identical."""

from __future__ import annotations

import json

import pytest
import torch
from ldm_layout import CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX, to_ldm_state_dict, write_single_file

V1_KEY = "model.diffusion_model.output_blocks.11.0.skip_connection.weight"


def _build(down_block_types, seed=0):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffferv_cli.models.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    up_block_types = tuple(
        kind.replace("Down", "Up") for kind in reversed(down_block_types)
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=down_block_types,
            up_block_types=up_block_types,
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=32,
        )
        vae = AutoencoderKL(
            block_out_channels=(32, 64),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            layers_per_block=1,
            norm_num_groups=32,
            latent_channels=4,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=32,
                intermediate_size=37,
                num_attention_heads=4,
                num_hidden_layers=2,
                vocab_size=1000,
                max_position_embeddings=77,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        # Random norms/biases too, so that a swapped or dropped tensor cannot pass by being all ones/zeros.
        for module in (unet, vae, text_encoder):
            for param in module.parameters():
                param.data.normal_()
            module.eval().requires_grad_(False)
    return unet, vae, text_encoder, tokenizer


def _save_config_folder(folder, unet, vae, text_encoder, tokenizer):
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=PNDMScheduler(skip_prk_steps=True, steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    assert json.loads((folder / "model_index.json").read_text())["unet"][1] == "UNet2DConditionModel"
    return folder


def _assert_identical(original, loaded, what):
    want, got = original.state_dict(), loaded.state_dict()
    assert sorted(want) == sorted(got), what
    for key in want:
        assert got[key].dtype == want[key].dtype, f"{what}: {key}"
        assert got[key].shape == want[key].shape, f"{what}: {key}"
        assert torch.equal(got[key], want[key]), f"{what}: {key} differs"


@pytest.fixture(
    scope="module",
    params=[("CrossAttnDownBlock2D", "DownBlock2D"), ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D")],
    ids=["attn-plain", "attn-attn"],
)
def model(request, tmp_path_factory):
    unet, vae, text_encoder, tokenizer = _build(request.param)
    folder = _save_config_folder(tmp_path_factory.mktemp("sd-config"), unet, vae, text_encoder, tokenizer)
    return unet, vae, text_encoder, tokenizer, folder


def test_layout_keys(model):
    unet, vae, text_encoder, _, _ = model
    sd = to_ldm_state_dict(unet, vae, text_encoder)
    n_params = sum(len(m.state_dict()) for m in (unet, vae, text_encoder))
    assert len(sd) == n_params
    assert all(k.startswith((UNET_PREFIX, VAE_PREFIX, CLIP_PREFIX)) for k in sd)
    for key in (
        "model.diffusion_model.time_embed.0.weight",
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.input_blocks.1.0.in_layers.0.weight",
        "model.diffusion_model.input_blocks.1.1.proj_in.weight",
        "model.diffusion_model.input_blocks.2.0.op.weight",
        "model.diffusion_model.input_blocks.3.0.skip_connection.weight",
        "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.middle_block.2.out_layers.3.weight",
        "model.diffusion_model.output_blocks.0.0.emb_layers.1.weight",
        "model.diffusion_model.out.2.weight",
        "first_stage_model.encoder.down.0.block.0.conv1.weight",
        "first_stage_model.encoder.down.0.downsample.conv.weight",
        "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight",
        "first_stage_model.decoder.up.1.upsample.conv.weight",
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight",
        "first_stage_model.encoder.mid.attn_1.proj_out.weight",
        "first_stage_model.post_quant_conv.weight",
        "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",
        "cond_stage_model.transformer.text_model.final_layer_norm.weight",
    ):
        assert key in sd, key
    assert sd["first_stage_model.decoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    # The upsampler of up block 0 is slot 2 after an attention, slot 1 without.
    slot = 2 if "CrossAttn" in unet.config.up_block_types[0] else 1
    assert f"model.diffusion_model.output_blocks.1.{slot}.conv.weight" in sd


def test_round_trip_through_diffusers_converters(model, tmp_path):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from safetensors.torch import load_file
    from transformers import CLIPTextModel

    unet, vae, text_encoder, _, folder = model
    path = write_single_file(tmp_path / "tiny-sd1.safetensors", unet, vae, text_encoder)
    checkpoint = load_file(str(path))
    assert checkpoint.keys() == to_ldm_state_dict(unet, vae, text_encoder).keys()

    kwargs = dict(config=str(folder), local_files_only=True)
    _assert_identical(unet, UNet2DConditionModel.from_single_file(checkpoint, subfolder="unet", **kwargs), "unet")
    _assert_identical(vae, AutoencoderKL.from_single_file(checkpoint, subfolder="vae", **kwargs), "vae")
    clip = create_diffusers_clip_model_from_ldm(CLIPTextModel, checkpoint, subfolder="text_encoder", **kwargs)
    _assert_identical(text_encoder, clip, "text_encoder")


def test_pipeline_from_single_file(model, tmp_path):
    from diffusers import StableDiffusionPipeline

    unet, vae, text_encoder, _, folder = model
    path = write_single_file(tmp_path / "tiny-sd1.safetensors", unet, vae, text_encoder)
    pipe = StableDiffusionPipeline.from_single_file(str(path), config=str(folder), local_files_only=True)
    _assert_identical(unet, pipe.unet, "unet")
    _assert_identical(vae, pipe.vae, "vae")
    _assert_identical(text_encoder, pipe.text_encoder, "text_encoder")


def test_detected_as_v1(model):
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    unet, vae, text_encoder, _, _ = model
    sd = to_ldm_state_dict(unet, vae, text_encoder)
    assert V1_KEY not in sd  # too small for SD1's 12 output blocks ...
    assert infer_diffusers_model_type(sd) == "v1"  # ... but "v1" is the fallback when nothing else matches
    # A test that wants the explicit v1 marker can add it through `extra`:
    sd[V1_KEY] = torch.zeros(320, 640, 1, 1)
    assert infer_diffusers_model_type(sd) == "v1"


def test_extra_keys_are_written(model, tmp_path):
    from safetensors.torch import load_file

    unet, vae, text_encoder, _, _ = model
    extra = {"model_ema.decay": torch.tensor(0.9999), "first_stage_model.quant_conv.bias": torch.zeros(8)}
    path = write_single_file(tmp_path / "x.safetensors", unet, vae, text_encoder, extra=extra)
    loaded = load_file(str(path))
    assert torch.equal(loaded["model_ema.decay"], extra["model_ema.decay"])
    assert torch.equal(loaded["first_stage_model.quant_conv.bias"], torch.zeros(8))
