"""What a model is and how it is asked for: families refused before any work, --clip-skip as diffusers'
pipelines define it, --prediction-type and --clip-skip reaching the loader from every command, and both
entering the cache key."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

from diffferv_cli.cli import app
from diffferv_cli.errors import UserError
from diffferv_cli.models.families import SD15_SCHEDULER
from diffferv_cli.models.loading import load_components, save_components


def test_clip_skip_is_diffusers_clip_skip(tiny):
    """diffusers' pipelines: no skip is the encoder's output; skip N is hidden state -(N + 1) through the final
    layer norm (their own code path reaches the norm through `text_model`, which transformers 5 removed, so
    the skip is written out here)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from diffferv_cli.editing.prompts import encode_prompts

    pipe = StableDiffusionPipeline(vae=tiny.vae, text_encoder=tiny.text_encoder, tokenizer=tiny.tokenizer,
                                   unet=tiny.unet, scheduler=DDIMScheduler(**SD15_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    prompt = "a photo of an old person"
    expected, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
    assert torch.equal(encode_prompts(tiny, [prompt]), expected)
    ids = tiny.tokenizer([prompt], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.inference_mode():
        states = tiny.text_encoder(ids, output_hidden_states=True).hidden_states
        skipped = tiny.text_encoder.final_layer_norm(states[-2])
    ours = encode_prompts(replace(tiny, clip_skip=1), [prompt])
    assert torch.equal(ours, skipped)
    assert not torch.allclose(ours, expected)


def test_clip_skip_and_the_schedule_enter_the_cache_key(tiny):
    from diffferv_cli.models.families import ddim_config

    assert tiny.identity == {"model": tiny.fingerprint}
    assert replace(tiny, clip_skip=1).identity == {"model": tiny.fingerprint, "clip_skip": 1}
    v_model = replace(tiny, scheduler_config=ddim_config(SD15_SCHEDULER, "v_prediction"))
    assert v_model.identity["scheduler"]["prediction_type"] == "v_prediction"


def test_a_folder_keeps_its_own_schedule_and_the_override_wins(tiny, tmp_path):
    v_model = replace(tiny, scheduler_config={**SD15_SCHEDULER, "prediction_type": "v_prediction",
                                              "timestep_spacing": "trailing"})
    save_components(v_model, tmp_path / "model")
    loaded = load_components(str(tmp_path / "model"), device="cpu")
    assert loaded.scheduler_config["prediction_type"] == "v_prediction"
    assert loaded.scheduler_config["timestep_spacing"] == "trailing"
    overridden = load_components(str(tmp_path / "model"), device="cpu", prediction_type="epsilon", clip_skip=1)
    assert overridden.scheduler_config["prediction_type"] == "epsilon" and overridden.clip_skip == 1
    with pytest.raises(UserError, match="--clip-skip 2 is too large: the text encoder has 2 layers"):
        load_components(str(tmp_path / "model"), device="cpu", clip_skip=2)


@pytest.mark.parametrize("pipeline", ["StableDiffusion3Pipeline", "FluxPipeline"])
def test_families_that_are_not_unet_latent_diffusion_are_refused_before_any_weight_loads(tmp_path, pipeline):
    folder = tmp_path / "model"
    (folder / "transformer").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))
    with pytest.raises(UserError) as error:
        load_components(str(folder), device="cpu")
    message = str(error.value)
    assert pipeline in message and "Stable Diffusion 1.x, 2.x and SDXL" in message and "\n" not in message


def test_refusal_on_the_command_line_is_exit_2_before_decoding(tmp_path, monkeypatch):
    from diffferv_cli.video import io

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    monkeypatch.setattr(io, "read_clip", lambda *a, **k: pytest.fail("the clip was decoded"))
    from media import make_test_clip

    clip = make_test_clip(tmp_path / "clip.mp4", width=48, height=32, frames=2, fps=24)
    result = CliRunner().invoke(app, ["invert", str(clip), "--model", str(folder), "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert "StableDiffusion3Pipeline" in result.output


class Stop(Exception):
    pass


@pytest.mark.parametrize("command", ["invert", "edit", "reconstruct"])
def test_prediction_type_and_clip_skip_reach_the_loader(tmp_path, monkeypatch, command):
    from diffferv_cli.models import loading

    seen = {}

    def loader(model, **kwargs):
        seen.update(kwargs, model=model)
        raise Stop

    monkeypatch.setattr(loading, "load_components", loader)
    from media import make_test_clip

    clip = make_test_clip(tmp_path / "clip.mp4", width=48, height=32, frames=2, fps=24)
    extra = ["--preset", "age"] if command == "edit" else []
    result = CliRunner().invoke(app, [command, str(clip), *extra, "--model", "tiny-random", "--frames", "2",
                                      "--prediction-type", "v_prediction", "--clip-skip", "2"])
    assert isinstance(result.exception, Stop), result.output
    assert (seen["model"], seen["prediction_type"], seen["clip_skip"]) == ("tiny-random", "v_prediction", 2)


def test_an_unknown_prediction_type_is_refused_by_the_option(tmp_path):
    result = CliRunner().invoke(app, ["invert", str(tmp_path / "missing.mp4"), "--prediction-type", "flow"])
    assert result.exit_code == 2 and "is not one of epsilon, v_prediction, sample" in result.output


def test_a_hub_model_of_another_family_is_refused_before_its_weights_download(tmp_path, monkeypatch):
    import huggingface_hub

    from diffferv_cli.models import loading

    hub = tmp_path / "hf" / "hub"
    snapshot = hub / "models--someone--sd3-model" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    (hub / "models--someone--sd3-model" / "refs").mkdir()
    (hub / "models--someone--sd3-model" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(loading, "hub_offline", lambda: False)
    monkeypatch.setattr(loading, "_in_hub_cache", lambda *a: False)  # its weights are not there
    monkeypatch.setattr(loading, "hub_reachable", lambda *a: (True, ""))
    fetched = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, name, **k: fetched.append(name))
    monkeypatch.setattr(loading, "_load_from_pretrained", lambda *a, **k: pytest.fail("weights were downloaded"))
    with pytest.raises(UserError, match="StableDiffusion3Pipeline"):
        load_components("someone/sd3-model", device="cpu")
    assert fetched == ["model_index.json"]
