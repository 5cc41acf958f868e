"""SD 2.x end to end on a tiny SD 2-shaped model (linear attention projections, 64-channel heads, a GELU
text encoder, v-prediction with trailing timesteps as SD 2.1 768-v is sampled), and the skeleton of a
full-size SD 2.x single file."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from diffferv_cli.cli import app
from diffferv_cli.models.families import SD15_SCHEDULER

V_SCHEDULE = {**SD15_SCHEDULER, "prediction_type": "v_prediction", "timestep_spacing": "trailing", "steps_offset": 0}


def _tiny_sd2(folder):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffferv_cli.models.components import Components
    from diffferv_cli.models.loading import save_components
    from diffferv_cli.models.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        unet = UNet2DConditionModel(sample_size=8, block_out_channels=(64, 128), layers_per_block=1,
                                    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                                    cross_attention_dim=64, attention_head_dim=(1, 2), use_linear_projection=True,
                                    norm_num_groups=32)
        vae = AutoencoderKL(block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=8)
        text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96,
                                            num_attention_heads=1, num_hidden_layers=2, hidden_act="gelu",
                                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                            pad_token_id=tokenizer.pad_token_id))
    save_components(Components(unet, vae, text, tokenizer, dict(V_SCHEDULE), "sd2-tiny", "sd2-tiny"), folder)
    return folder


def test_an_sd2_model_inverts_edits_and_reconstructs_with_its_v_schedule(tmp_path):
    from media import decode_all, make_test_clip

    from diffferv_cli.models.loading import load_components

    model = _tiny_sd2(tmp_path / "sd2")
    loaded = load_components(str(model), device="cpu")
    assert loaded.scheduler_config["prediction_type"] == "v_prediction"
    assert loaded.scheduler_config["timestep_spacing"] == "trailing"
    clip = make_test_clip(tmp_path / "clip.mp4", width=96, height=64, frames=3, fps=24)
    common = ["--model", str(model), "--size", "64", "--steps", "2", "--frames", "3", "--flow-preset", "ultrafast",
              "--cache-dir", str(tmp_path / "cache")]
    result = CliRunner().invoke(app, ["edit", str(clip), "-p", "age", *common, "-o", str(tmp_path / "age.mp4")])
    assert result.exit_code == 0, result.output
    rec = tmp_path / "rec.mp4"
    result = CliRunner().invoke(app, ["reconstruct", str(clip), *common, "--exact", "--lossless", "-o", str(rec)])
    assert result.exit_code == 0, result.output
    assert np.array_equal(decode_all(rec), decode_all(clip)[:3])
    manifests = list((tmp_path / "cache").glob("*/manifest.json"))
    import json

    requests = [json.loads(path.read_text())["request"] for path in manifests]
    assert [request["scheduler"]["prediction_type"] for request in requests] == ["v_prediction"]
    assert requests[0]["scheduler"]["timestep_spacing"] == "trailing"


def test_the_sd2_skeleton_of_a_full_size_768_v_file():
    """SD 2.1's architecture from its original-layout shapes: 64-channel heads, linear projections, 1024-wide
    OpenCLIP text (23 of its 24 layers, as diffusers keeps), and 768 px for the v model."""
    from diffusers import UNet2DConditionModel

    from diffferv_cli.models.skeletons import OPEN_CLIP, skeleton

    sd2 = dict(sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
               block_out_channels=(320, 640, 1280, 1280))
    with torch.device("meta"):
        unet = UNet2DConditionModel(**sd2)
    from ldm_layout import _unet_key_map  # the UNet part of the original layout

    state = unet.state_dict()
    shapes = {f"model.diffusion_model.{ldm}": tuple(state[key].shape) for key, ldm in _unet_key_map(unet).items()}
    shapes.update({f"first_stage_model.encoder.down.{level}.block.{block}.conv1.weight": (width, width, 3, 3)
                   for level, width in enumerate((128, 256, 512, 512)) for block in range(2)})
    shapes.update({"first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3),
                   "first_stage_model.decoder.conv_out.weight": (3, 128, 3, 3),
                   "first_stage_model.quant_conv.weight": (8, 8, 1, 1),
                   f"{OPEN_CLIP}token_embedding.weight": (49408, 1024),
                   f"{OPEN_CLIP}positional_embedding": (77, 1024)})
    shapes.update({f"{OPEN_CLIP}transformer.resblocks.{layer}.mlp.c_fc.weight": (4096, 1024) for layer in range(24)})
    files = skeleton(shapes, "v2", "v_prediction")
    built = UNet2DConditionModel.from_config(files["unet/config.json"]).config
    for key, value in unet.config.items():
        if key != "_use_default_values":
            assert built[key] == value or list(built[key]) == list(value), key
    text = files["text_encoder/config.json"]
    assert (text["hidden_size"], text["num_hidden_layers"], text["num_attention_heads"], text["intermediate_size"],
            text["hidden_act"]) == (1024, 23, 16, 4096, "gelu")
    assert files["scheduler/scheduler_config.json"]["prediction_type"] == "v_prediction"
    assert files["tokenizer/tokenizer_config.json"]["pad_token"] == "!"  # SD 2's OpenCLIP pads with "!"
    assert skeleton(shapes, "v2", "epsilon")["unet/config.json"]["sample_size"] == 64  # the 512 base model


@pytest.mark.parametrize("step, expected", [(875000, "epsilon"), (None, "v_prediction")])
def test_an_sd2_ckpts_prediction_type_follows_diffusers_rule(tmp_path, step, expected):
    from diffferv_cli.models.single_file import prediction_of

    path = tmp_path / "sd2.ckpt"
    torch.save({"state_dict": {}, **({"global_step": step} if step else {})}, str(path))
    assert prediction_of("v2", {}, path, None) == expected
    assert prediction_of("v2", {}, path, "sample") == "sample"
    assert prediction_of("v1", {}, path, None) == "epsilon"
