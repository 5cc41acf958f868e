import torch

from diffferv_cli.components import build_tiny_random, load_components, save_components
from diffferv_cli.errors import UserError


def test_tiny_random_is_deterministic_and_labelled():
    first, second = build_tiny_random(seed=0), build_tiny_random(seed=0)
    for a, b in zip(first.unet.parameters(), second.unet.parameters(), strict=True):
        assert torch.equal(a, b)
    assert first.is_random and "RANDOM WEIGHTS" in first.label
    assert first.vae_scale_factor == 8


def test_tiny_random_runs_a_non_square_step(tiny):
    ids = tiny.tokenizer(["a photo of a person"] * 2, padding="max_length", max_length=77, return_tensors="pt").input_ids
    text = tiny.text_encoder(ids)[0]
    latents = torch.randn(2, 4, 8, 12)
    out = tiny.unet(latents, 10, encoder_hidden_states=text).sample
    assert out.shape == (2, 4, 8, 12)


def test_folder_round_trip(tiny, tmp_path):
    save_components(tiny, tmp_path / "model")
    loaded = load_components(str(tmp_path / "model"), device="cpu")
    for a, b in zip(tiny.unet.parameters(), loaded.unet.parameters(), strict=True):
        assert torch.equal(a, b)
    assert loaded.fingerprint.startswith("folder-")
    assert loaded.tokenizer("a photo").input_ids == tiny.tokenizer("a photo").input_ids


def test_missing_hub_model_is_one_clear_sentence(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        load_components("someone/not-a-model", device="cpu")
    except UserError as err:
        assert "--model" in err.message and "\n" not in err.message
    else:
        raise AssertionError("expected UserError")


def test_folder_without_unet_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    try:
        load_components(str(tmp_path / "empty"), device="cpu")
    except UserError as err:
        assert "unet" in err.message
    else:
        raise AssertionError("expected UserError")
