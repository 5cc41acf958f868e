import time

import pytest
import torch

from diffferv_cli.errors import UserError
from diffferv_cli.models.loading import load_components, save_components
from diffferv_cli.models.tiny import build_tiny_random


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
    from diffferv_cli.models import loading as components

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(components, "hub_reachable", _no_network_use)  # offline: not even a probe
    try:
        load_components("someone/not-a-model", device="cpu")
    except UserError as err:
        assert "--model" in err.message and "\n" not in err.message and "HF_HUB_OFFLINE" in err.message
    else:
        raise AssertionError("expected UserError")


def _no_network_use(*args, **kwargs):
    raise AssertionError("the network was used")


def _closed_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def unreachable_hub(monkeypatch, tmp_path):
    """An empty Hugging Face cache, HF_HUB_OFFLINE unset and the hub endpoint pointed at a closed local
    port: every request the probe makes is refused at once, and nothing can reach the real hub. The
    network download must not run."""
    from huggingface_hub import constants

    from diffferv_cli.models import loading as components

    (tmp_path / "hf-cache").mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # read when huggingface_hub was imported
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    real_load = components._load_from_pretrained

    def local_only(source, local_only, *args):
        assert local_only, "a download was attempted although the hub cannot be reached"
        return real_load(source, local_only, *args)

    monkeypatch.setattr(components, "_load_from_pretrained", local_only)


def test_uncached_default_model_without_a_hub_fails_in_seconds(tmp_path, unreachable_hub):
    """The default model, not cached (an empty cache), no hub: one sentence after one refused request,
    instead of minutes of download retries."""
    from diffferv_cli.config import DEFAULT_MODEL

    started = time.monotonic()
    with pytest.raises(UserError) as caught:
        load_components(DEFAULT_MODEL, device="cpu")
    elapsed = time.monotonic() - started
    message = caught.value.message
    print(f"failed after {elapsed:.2f} s: {message}")
    assert elapsed < 10
    assert "hub cannot be reached" in message and "--model" in message and "\n" not in message


def test_cli_invert_without_model_or_hub_is_one_line(tmp_path, unreachable_hub):
    from media import make_test_clip
    from typer.testing import CliRunner

    from diffferv_cli.cli import app

    clip = make_test_clip(tmp_path / "clip.mp4", width=64, height=48, frames=2, fps=8)
    result = CliRunner().invoke(app, ["invert", str(clip), "--size", "64", "--device", "cpu",
                                      "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "--model" in errors[0] and "Traceback" not in result.output
    assert "Retrying" not in result.output


def test_hub_probe_gives_up_on_a_silent_server(monkeypatch):
    """A server that accepts the connection and never answers: the probe returns within its timeout."""
    import socket

    from huggingface_hub import constants

    from diffferv_cli.models.loading import hub_reachable

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
        started = time.monotonic()
        reachable, why = hub_reachable(timeout=0.5)
        elapsed = time.monotonic() - started
    print(f"silent server: {why!r} after {elapsed:.2f} s")
    assert not reachable and why
    assert elapsed < 2.0


def test_device_names_are_checked():
    from diffferv_cli.models.devices import pick_device

    assert pick_device("cpu") == torch.device("cpu") and pick_device(" CPU ") == torch.device("cpu")
    for name, fragment in (("npu", "Unknown device"), ("cuda:x", "Unknown device"), ("cpu:1", "Unknown device"),
                           ("meta", "Unknown device"), ("", None)):
        if fragment is None:
            assert pick_device(name).type in ("cpu", "cuda", "mps")  # empty means auto
            continue
        with pytest.raises(UserError, match=fragment):
            pick_device(name)
    if not torch.cuda.is_available():
        for name in ("cuda", "cuda:0", "cuda:9"):
            with pytest.raises(UserError, match="CUDA is not available"):
                pick_device(name)
    else:
        with pytest.raises(UserError, match="CUDA device"):
            pick_device(f"cuda:{torch.cuda.device_count()}")
    if not (torch.backends.mps.is_available()):
        with pytest.raises(UserError, match="MPS"):
            pick_device("mps")


def test_folder_without_unet_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    try:
        load_components(str(tmp_path / "empty"), device="cpu")
    except UserError as err:
        assert "unet" in err.message
    else:
        raise AssertionError("expected UserError")
