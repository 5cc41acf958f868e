"""SDXL end to end on a tiny SDXL-shaped model: two text encoders with the pooled embedding and time ids
as diffusers' SDXL pipeline makes them, SWCFA/TTA only where SDXL has attention, the stock UNet on a
static clip, and invert / edit / reconstruct from the command line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from diffferv_cli.cli import app
from diffferv_cli.editing.inversion import attention_grids
from diffferv_cli.editing.prompts import encode_conditioning, token_alignment, token_alignment_all
from diffferv_cli.models.tiny import build_tiny_sdxl

PROMPT = "a photo of an old person"


@pytest.fixture(scope="module")
def sdxl():
    return build_tiny_sdxl()


def _pipeline(sdxl):
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(vae=sdxl.vae, text_encoder=sdxl.text_encoder, text_encoder_2=sdxl.text_encoder_2,
                                     tokenizer=sdxl.tokenizer, tokenizer_2=sdxl.tokenizer_2, unet=sdxl.unet,
                                     scheduler=DDIMScheduler(**sdxl.scheduler_config))


def test_the_conditioning_is_diffusers_sdxl_pipelines(sdxl):
    pipe = _pipeline(sdxl)
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    states, added = encode_conditioning(sdxl, [PROMPT, PROMPT], (64, 96))
    assert torch.equal(states[0], embeds[0]) and torch.equal(states[1], embeds[0])
    assert torch.equal(added["text_embeds"][0], pooled[0])
    time_ids = pipe._get_add_time_ids((64, 96), (0, 0), (64, 96), dtype=torch.float32,
                                      text_encoder_projection_dim=sdxl.text_encoder_2.config.projection_dim)
    assert torch.equal(added["time_ids"], time_ids.repeat(2, 1))


def test_clip_skip_moves_both_encoders_one_layer_down(sdxl):
    from dataclasses import replace

    pipe = _pipeline(sdxl)
    embeds, _, _, _ = pipe.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=1,
                                         do_classifier_free_guidance=False, clip_skip=1)
    assert torch.equal(encode_conditioning(replace(sdxl, clip_skip=1), [PROMPT], (64, 64))[0], embeds)


def test_trajectories_are_built_for_the_grids_with_attention_only(sdxl, tiny):
    assert attention_grids(sdxl.unet, (8, 12)) == [(4, 6), (2, 3)]  # no attention on SDXL's first level
    assert attention_grids(tiny.unet, (8, 12)) == [(8, 12), (4, 6)]
    from diffferv_cli.models.tiny import SD15_UNET_CONFIG

    with torch.device("meta"):
        from diffusers import UNet2DConditionModel

        sd15 = UNet2DConditionModel(**SD15_UNET_CONFIG)
    assert attention_grids(sd15, (64, 64)) == [(64, 64), (32, 32), (16, 16), (8, 8)]  # the last: the mid block's


def test_word_alignment_holds_only_where_both_tokenizers_agree(sdxl):
    from dataclasses import replace

    from diffferv_cli.models.skeletons import clip_vocabulary

    source, edit = "a photo of a person", "a photo of a blond person"
    assert torch.equal(token_alignment_all(sdxl, source, edit), token_alignment(sdxl.tokenizer, source, edit))
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocabulary()
    other = CLIPTokenizer(vocab=vocab, merges=[tuple(merge.split()) for merge in merges], model_max_length=77)
    mixed = token_alignment_all(replace(sdxl, tokenizer_2=other), source, edit)
    byte_level, bpe = token_alignment(sdxl.tokenizer, source, edit), token_alignment(other, source, edit)
    assert torch.equal(mixed, torch.where(byte_level == bpe, byte_level, -1)) and (mixed == -1).sum() > (byte_level == -1).sum()


def test_a_static_clip_gives_the_stock_sdxl_unet(sdxl):
    from reference_attention import static_partition

    from diffferv_cli.temporal import AttentionContext, temporal_attention
    from diffferv_cli.temporal.trajectories import TrajectorySet

    frames, latent = 3, (8, 12)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, *latent, generator=generator).repeat(frames, 1, 1, 1)
    states, added = encode_conditioning(sdxl, [PROMPT] * frames, (64, 96))
    trajectories = TrajectorySet({grid: static_partition(*grid, frames) for grid in attention_grids(sdxl.unet, latent)})
    ctx = AttentionContext(frames=frames, latent_size=latent, window=3, trajectories=trajectories)
    with torch.no_grad():
        stock = sdxl.unet(latents, 500, states, added_cond_kwargs=added).sample
        with temporal_attention(sdxl.unet):
            temporal = sdxl.unet(latents, 500, states, added_cond_kwargs=added, cross_attention_kwargs={"ctx": ctx}).sample
            moving = sdxl.unet(latents + torch.randn_like(latents), 500, states, added_cond_kwargs=added,
                               cross_attention_kwargs={"ctx": ctx}).sample
    assert float((temporal - stock).abs().max() / stock.abs().max()) < 1e-5
    stock_moving = sdxl.unet(latents + torch.randn_like(latents), 500, states, added_cond_kwargs=added).sample
    assert not torch.allclose(moving, stock_moving, atol=1e-3)  # the temporal layers do act where frames differ


def test_an_sdxl_folder_round_trips_and_its_geometry_is_read_from_its_configs(sdxl, tmp_path):
    import json

    from diffferv_cli.models.geometry import model_geometry
    from diffferv_cli.models.loading import load_components, save_components

    save_components(sdxl, tmp_path / "sdxl")
    loaded = load_components(str(tmp_path / "sdxl"), device="cpu")
    assert loaded.is_sdxl and loaded.tokenizer_2 is not None
    states, added = encode_conditioning(loaded, [PROMPT], (64, 64))
    expected_states, expected_added = encode_conditioning(sdxl, [PROMPT], (64, 64))
    assert torch.equal(states, expected_states) and torch.equal(added["text_embeds"], expected_added["text_embeds"])
    assert model_geometry(str(tmp_path / "sdxl")) == (32, 64)  # 3 levels, VAE /8; sample size 8 x 8
    config = json.loads((tmp_path / "sdxl" / "unet" / "config.json").read_text())
    (tmp_path / "sdxl" / "unet" / "config.json").write_text(json.dumps({**config, "sample_size": 128}))
    assert model_geometry(str(tmp_path / "sdxl")) == (32, 1024)  # SDXL's own 1024


def test_sdxls_vae_runs_in_float32_when_the_rest_is_fp16(tiny):
    model = build_tiny_sdxl().to("cpu", torch.float16)
    assert model.unet.dtype == torch.float16 and model.vae.dtype == torch.float32
    assert model.text_encoder_2.dtype == torch.float16
    from diffferv_cli.models.tiny import build_tiny_random

    assert build_tiny_random().to("cpu", torch.float16).vae.dtype == torch.float16  # SD 1.x as diffusers runs it


def test_invert_edit_and_reconstruct_run_from_the_command_line(tmp_path):
    from media import make_test_clip

    clip = make_test_clip(tmp_path / "clip.mp4", width=96, height=64, frames=3, fps=24)
    common = ["--model", "tiny-random-sdxl", "--size", "64", "--steps", "2", "--frames", "3",
              "--flow-preset", "ultrafast", "--cache-dir", str(tmp_path / "cache")]
    result = CliRunner().invoke(app, ["invert", str(clip), *common])
    assert result.exit_code == 0, result.output
    out = tmp_path / "out.mp4"
    result = CliRunner().invoke(app, ["edit", str(clip), "-p", "age", *common, "-o", str(out), "--lossless"])
    assert result.exit_code == 0, result.output
    assert "2 steps run" not in result.output  # the inversion was reused
    rec = tmp_path / "rec.mp4"
    result = CliRunner().invoke(app, ["reconstruct", str(clip), *common, "--exact", "--lossless", "-o", str(rec)])
    assert result.exit_code == 0, result.output
    from media import decode_all

    source = decode_all(clip)[:3]
    assert decode_all(out).shape == source.shape
    assert np.array_equal(decode_all(rec), source)  # the exact reconstruction composited is the source itself


def test_train_refuses_sdxl_in_one_sentence_before_loading(tmp_path, monkeypatch):
    from diffferv_cli.models import loading

    monkeypatch.setattr(loading, "load_components", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "faces").mkdir()
    result = CliRunner().invoke(app, ["train", "--faces", str(tmp_path / "faces"), "--out", str(tmp_path / "out"),
                                      "--model", "tiny-random-sdxl"])
    assert result.exit_code == 2, result.output
    assert "SDXL is not supported" in result.output


def test_the_training_loop_refuses_sdxl_too(sdxl, tmp_path):
    from diffferv_cli.config import TrainConfig
    from diffferv_cli.errors import UserError
    from diffferv_cli.training.loop import train

    with pytest.raises(UserError, match="SDXL is not supported"):
        train(sdxl, TrainConfig(faces=tmp_path, out=tmp_path / "out"))
