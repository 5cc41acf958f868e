"""Single-file checkpoints (original Stable Diffusion layout) load offline, with an empty Hugging Face
cache: the family and prediction type read from the file, configs from the shipped skeleton with the
file's own sizes, CLIP's real tokenizer, and a content fingerprint that survives renames."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from ldm_layout import to_ldm_state_dict, write_single_file
from typer.testing import CliRunner

from diffferv_cli.errors import UserError
from diffferv_cli.models.loading import load_components


def _sd1_modules(seed: int = 0, text_width: int = 64):
    """An SD 1.x-shaped model of the kind a single file carries (32 normalisation groups, 8 heads per
    attention layer, CLIP's 49,408-token vocabulary, quick-GELU), tiny."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                    cross_attention_dim=text_width, attention_head_dim=8, norm_num_groups=32)
        vae = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=32,
                            latent_channels=4)
        text = CLIPTextModel(CLIPTextConfig(hidden_size=text_width, intermediate_size=37, num_attention_heads=1,
                                            num_hidden_layers=2, vocab_size=49408, max_position_embeddings=77,
                                            hidden_act="quick_gelu"))
        for module in (unet, vae, text):
            for parameter in module.parameters():  # norms and biases too: a swapped tensor cannot hide
                parameter.data.normal_(std=0.2)
            module.eval().requires_grad_(False)
    return unet, vae, text


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """An empty Hugging Face home, offline."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


@pytest.fixture(scope="module")
def sd1():
    return _sd1_modules()


@pytest.fixture
def sd1_file(sd1, offline):
    return write_single_file(offline / "fine-tune.safetensors", *sd1)


def test_an_sd1_file_loads_offline_and_computes_what_its_modules_compute(sd1, sd1_file):
    unet, vae, text = sd1
    comps = load_components(str(sd1_file), device="cpu")
    latents, states = torch.randn(2, 4, 8, 12), torch.randn(2, 77, 64)
    assert torch.equal(comps.unet(latents, 10, encoder_hidden_states=states).sample,
                       unet(latents, 10, encoder_hidden_states=states).sample)
    ids = comps.tokenizer(["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]  # CLIP's own ids
    assert torch.equal(comps.text_encoder(ids)[0], text(ids)[0])
    image = torch.rand(1, 3, 32, 48) * 2 - 1
    assert torch.equal(comps.vae.encode(image).latent_dist.mean, vae.encode(image).latent_dist.mean)
    assert comps.vae.config.scaling_factor == 0.18215
    assert comps.scheduler_config["prediction_type"] == "epsilon" and comps.scheduler_config["beta_end"] == 0.012
    assert comps.fingerprint.startswith("file-sha256-") and not comps.is_random


def test_a_v_prediction_marker_or_the_option_sets_the_prediction_type(sd1, offline):
    marked = write_single_file(offline / "v.safetensors", *sd1, extra={"v_pred": torch.zeros(0)})
    assert load_components(str(marked), device="cpu").scheduler_config["prediction_type"] == "v_prediction"
    plain = write_single_file(offline / "e.safetensors", *sd1)
    loaded = load_components(str(plain), device="cpu", prediction_type="v_prediction")
    assert loaded.scheduler_config["prediction_type"] == "v_prediction"


def test_the_fingerprint_follows_the_content_and_each_file_is_hashed_once(sd1_file, monkeypatch):
    from diffferv_cli.models import single_file

    hashed = []
    real = single_file.hashlib.sha256

    def counting():
        hashed.append(1)
        return real()

    monkeypatch.setattr(single_file.hashlib, "sha256", counting)
    first = single_file.content_fingerprint(sd1_file)
    assert single_file.content_fingerprint(sd1_file) == first and len(hashed) == 1  # remembered
    renamed = sd1_file.with_name("renamed.safetensors")
    sd1_file.rename(renamed)
    assert single_file.content_fingerprint(renamed) == first and len(hashed) == 2  # hashed once more, same value
    os.utime(renamed, (1_000_000_000, 1_000_000_000))
    assert single_file.content_fingerprint(renamed) == first
    data = bytearray(renamed.read_bytes())
    data[-1] ^= 1  # the last weight byte
    stat = renamed.stat()
    renamed.write_bytes(bytes(data))
    os.utime(renamed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert single_file.content_fingerprint(renamed) != first


def test_a_renamed_copy_reuses_the_inversion_and_an_edited_one_does_not(sd1, sd1_file, tmp_path):
    from diffferv_cli.config import InversionConfig
    from diffferv_cli.editing.inversion import cache_request

    class Clip:  # what cache_request reads
        frames = __import__("numpy").zeros((1, 32, 32, 3), "uint8")
        spec = type("Spec", (), {"start": 0, "frames": 1, "stride": 1, "region": None})()
        frame_indices = [0]
        geometry = type("Geometry", (), {"working_size": (32, 32)})()

    config = InversionConfig(steps=1)
    original = cache_request(Clip, load_components(str(sd1_file), device="cpu"), config)
    copy = sd1_file.with_name("copy.safetensors")
    copy.write_bytes(sd1_file.read_bytes())
    assert cache_request(Clip, load_components(str(copy), device="cpu"), config) == original
    edited = write_single_file(sd1_file.with_name("edited.safetensors"), *_sd1_modules(seed=1))
    assert cache_request(Clip, load_components(str(edited), device="cpu"), config)["model"] != original["model"]


def test_other_families_and_non_checkpoints_are_refused_in_one_sentence(offline):
    from safetensors.torch import save_file

    sdxl = offline / "xl.safetensors"
    save_file({"conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias": torch.zeros(4),
               "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, str(sdxl))
    other = offline / "other.safetensors"
    save_file({"transformer.weight": torch.zeros(2)}, str(other))
    text = offline / "notes.safetensors"
    text.write_text("not a checkpoint")
    for path, words in ((sdxl, "is an SDXL refiner"), (other, "not a Stable Diffusion 1.x, 2.x or SDXL checkpoint"),
                        (text, "not a readable checkpoint")):
        with pytest.raises(UserError) as error:
            load_components(str(path), device="cpu")
        assert words in str(error.value) and "\n" not in str(error.value), str(error.value)
        assert "a .safetensors checkpoint" not in str(error.value)  # the user passed one


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch pickled-code-ran",))


def test_a_ckpt_never_runs_its_pickled_code(offline, monkeypatch):
    monkeypatch.chdir(offline)
    path = offline / "model.ckpt"
    path.write_bytes(pickle.dumps({"state_dict": {"x": _Payload()}}))
    with pytest.raises(UserError, match="without running its pickled code"):
        load_components(str(path), device="cpu")
    assert not (offline / "pickled-code-ran").exists()


def test_a_ckpt_of_plain_tensors_loads(sd1, offline):
    path = offline / "model.ckpt"
    torch.save({"state_dict": to_ldm_state_dict(*sd1), "global_step": 1}, str(path))
    comps = load_components(str(path), device="cpu")
    latents, states = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 64)
    assert torch.equal(comps.unet(latents, 5, encoder_hidden_states=states).sample,
                       sd1[0](latents, 5, encoder_hidden_states=states).sample)


def test_the_sd1_skeleton_of_a_full_size_file_is_sd15s_config():
    """The skeleton read from full-size SD 1.5 shapes (meta tensors: no memory) is SD 1.5's architecture."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffferv_cli.models.skeletons import skeleton
    from diffferv_cli.models.tiny import SD15_UNET_CONFIG

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, sample_size=512)
        text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                            num_hidden_layers=12, vocab_size=49408, max_position_embeddings=77))
    shapes = {key: tuple(value.shape) for key, value in to_ldm_state_dict(unet, vae, text).items()}
    files = skeleton(shapes, "v1", "epsilon")
    built = UNet2DConditionModel.from_config(files["unet/config.json"]).config
    for key, value in unet.config.items():
        if key != "_use_default_values":
            assert built[key] == value or list(built[key]) == list(value), key
    text_config = files["text_encoder/config.json"]
    assert (text_config["hidden_size"], text_config["num_hidden_layers"], text_config["num_attention_heads"],
            text_config["intermediate_size"], text_config["hidden_act"]) == (768, 12, 12, 3072, "quick_gelu")
    assert files["vae/config.json"]["block_out_channels"] == [128, 256, 512, 512]


def test_a_single_file_model_inverts_from_the_command_line(sd1_file, tmp_path):
    from media import make_test_clip

    from diffferv_cli.cli import app

    clip = make_test_clip(tmp_path / "clip.mp4", width=48, height=32, frames=2, fps=24)
    result = CliRunner().invoke(app, ["invert", str(clip), "--model", str(sd1_file), "--size", "64", "--steps", "1",
                                      "--frames", "2", "--flow-preset", "ultrafast", "--device", "cpu",
                                      "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    assert "1 steps run" in result.output


@pytest.mark.slow
def test_a_full_size_sd15_file_loads_offline_in_fp16_like_its_folder(offline):
    from diffferv_cli.models.loading import save_components
    from diffferv_cli.models.tiny import build_full_size_random

    comps = build_full_size_random()
    path = write_single_file(offline / "sd15.safetensors", comps.unet.half(), comps.vae.half(),
                             comps.text_encoder.half())
    save_components(comps, offline / "sd15-folder")
    from_file = load_components(str(path), device="cpu", dtype="fp16")
    from_folder = load_components(str(offline / "sd15-folder"), device="cpu", dtype="fp16")
    for a, b in zip(from_file.unet.parameters(), from_folder.unet.parameters(), strict=True):
        assert torch.equal(a, b)


def _sdxl_modules(seed: int = 0):
    """An SDXL-shaped model of the kind a single file carries (64-channel heads, 32 groups, CLIP's
    vocabulary in both encoders, the second with ten layers and a projection), tiny."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    text = dict(vocab_size=49408, intermediate_size=48, max_position_embeddings=77)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(sample_size=8, block_out_channels=(64, 128, 128), layers_per_block=1,
                                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                                    transformer_layers_per_block=(1, 1, 2), attention_head_dim=(1, 2, 2),
                                    use_linear_projection=True, cross_attention_dim=64 + 128, norm_num_groups=32,
                                    addition_embed_type="text_time", addition_time_embed_dim=8,
                                    projection_class_embeddings_input_dim=6 * 8 + 32)
        vae = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=32,
                            latent_channels=4, scaling_factor=0.13025)
        # widths differ, as SDXL's 768 and 1280 do: diffusers tells the two encoders apart by them
        first = CLIPTextModel(CLIPTextConfig(hidden_size=64, num_attention_heads=1, num_hidden_layers=2,
                                             hidden_act="quick_gelu", **text))
        second = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=128, num_attention_heads=2, num_hidden_layers=10,
                                                            hidden_act="gelu", projection_dim=32, **text))
        for module in (unet, vae, first, second):
            for parameter in module.parameters():
                parameter.data.normal_(std=0.2)
            module.eval().requires_grad_(False)
    return unet, vae, first, second


def test_an_sdxl_file_loads_offline_with_both_text_encoders(offline):
    from ldm_layout import write_sdxl_single_file

    from diffferv_cli.editing.prompts import encode_conditioning

    unet, vae, first, second = _sdxl_modules()
    path = write_sdxl_single_file(offline / "xl.safetensors", unet, vae, first, second)
    comps = load_components(str(path), device="cpu")
    assert comps.is_sdxl and comps.tokenizer_2.pad_token == "!"
    ids = comps.tokenizer(["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.equal(comps.text_encoder(ids)[0], first(ids)[0])
    assert torch.equal(comps.text_encoder_2(ids).text_embeds, second(ids).text_embeds)
    states, added = encode_conditioning(comps, ["a photo of a cat"], (64, 96))
    latents = torch.randn(1, 4, 8, 12)
    assert torch.equal(comps.unet(latents, 10, states, added_cond_kwargs=added).sample,
                       unet(latents, 10, states, added_cond_kwargs=added).sample)
    assert comps.vae.config.scaling_factor == 0.13025 and comps.scheduler_config["prediction_type"] == "epsilon"


def test_a_file_missing_weights_is_one_sentence_not_a_half_loaded_model(sd1, offline):
    state = to_ldm_state_dict(*sd1)
    del state["model.diffusion_model.out.2.bias"]
    from safetensors.torch import save_file

    path = offline / "truncated.safetensors"
    save_file({key: value.contiguous() for key, value in state.items()}, str(path))
    with pytest.raises(UserError) as error:
        load_components(str(path), device="cpu")
    assert "\n" not in str(error.value) and ("out.bias" in str(error.value) or "could not be loaded" in str(error.value))
