"""LoRAs: `--lora FILE[:SCALE]` fused into the model (diffusers/peft and kohya files), part of the cache
key; `train --lora-rank` trains one and exports a file `--lora` reads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from diffferv_cli.cli import app
from diffferv_cli.errors import UserError
from diffferv_cli.models.loading import load_components
from diffferv_cli.models.lora import LORA_FILE, parse_lora
from diffferv_cli.models.tiny import build_tiny_random

RANK = 4
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def _random_lora(seed: int) -> tuple[dict, dict]:
    """peft state dicts (UNet, text encoder) of a rank-4 LoRA on the tiny model with random nonzero A and B."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    comps = build_tiny_random()
    comps.unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=UNET_TARGETS))
    inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=TEXT_TARGETS), comps.text_encoder)
    generator = torch.Generator().manual_seed(seed)
    states = []
    for module in (comps.unet, comps.text_encoder):
        state = get_peft_model_state_dict(module)
        states.append({name: torch.randn(tensor.shape, generator=generator) * 0.2 for name, tensor in state.items()})
    return states[0], states[1]


def _diffusers_file(folder: Path, seed: int) -> Path:
    """The LoRA in diffusers' layout, written by diffusers' own `save_lora_weights`."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    unet_state, text_state = _random_lora(seed)
    StableDiffusionPipeline.save_lora_weights(
        str(folder), unet_lora_layers=convert_state_dict_to_diffusers(unet_state),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(text_state), weight_name=f"lora{seed}.safetensors")
    return folder / f"lora{seed}.safetensors"


def _kohya_file(folder: Path, seed: int) -> Path:
    """The same LoRA in kohya/Civitai's layout: `lora_unet_<module_path_with_underscores>.lora_down.weight`,
    `lora_te_...` for the text encoder, and an `.alpha` per module (alpha = rank: scale 1)."""
    unet_state, text_state = _random_lora(seed)
    kohya = {}
    for prefix, state in (("lora_unet_", unet_state), ("lora_te_", text_state)):
        for name, tensor in state.items():
            module, factor = name.rsplit(".lora_", 1)  # "...attn1.to_q", "A.weight"
            stem = prefix + module.replace(".", "_")
            kohya[f"{stem}.{'lora_down' if factor.startswith('A') else 'lora_up'}.weight"] = tensor
            kohya[f"{stem}.alpha"] = torch.tensor(float(RANK))
    path = folder / f"kohya{seed}.safetensors"
    save_file(kohya, path)
    return path


@pytest.fixture(scope="module")
def loras(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("loras")
    return {"a": _diffusers_file(folder, 1), "b": _diffusers_file(folder, 2), "kohya_a": _kohya_file(folder, 1)}


def _inputs(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, 8, 8, generator=generator)  # (batch, 4, h, w)
    text = torch.randn(2, 77, 32, generator=generator)  # (batch, tokens, hidden)
    ids = torch.randint(0, 300, (2, 77), generator=generator)
    return latents, text, ids


@torch.no_grad()
def _outputs(comps, **unet_kwargs):
    latents, text, ids = _inputs()
    return comps.unet(latents, 500, text, **unet_kwargs).sample, comps.text_encoder(ids)[0]


def _tiny(*loras):
    return load_components("tiny-random", device="cpu", loras=list(loras))


# ------------------------------------------------------------------------------------ loading, fusing


def test_a_lora_at_scale_zero_is_the_model_without_it(loras):
    plain, fused = build_tiny_random(), _tiny((loras["a"], 0.0))
    for before, after in ((plain.unet, fused.unet), (plain.text_encoder, fused.text_encoder)):
        weights, fused_weights = before.state_dict(), after.state_dict()
        assert weights.keys() == fused_weights.keys()  # no adapter module is left behind
        assert all(torch.equal(weights[name], fused_weights[name]) for name in weights)


def test_a_fused_lora_at_scale_s_computes_what_diffusers_pipeline_computes_with_it(loras):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    scale = 0.6
    fused = _tiny((loras["a"], scale))
    reference = build_tiny_random()
    pipe = StableDiffusionPipeline(vae=reference.vae, text_encoder=reference.text_encoder,
                                   tokenizer=reference.tokenizer, unet=reference.unet,
                                   scheduler=DDIMScheduler.from_config(reference.scheduler_config),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(loras["a"]), adapter_name="reference")
    pipe.set_adapters(["reference"], adapter_weights=[scale])  # unfused adapters at `scale`, UNet and text encoder
    unet_out, text_out = _outputs(fused)
    unet_reference, text_reference = _outputs(reference)
    plain_unet, plain_text = _outputs(build_tiny_random())
    assert (unet_out - plain_unet).abs().max() > 1e-2 and (text_out - plain_text).abs().max() > 1e-2  # both changed
    assert torch.allclose(unet_out, unet_reference, atol=1e-5, rtol=0)
    assert torch.allclose(text_out, text_reference, atol=1e-5, rtol=0)
    assert not any("lora" in name for name in fused.unet.state_dict())  # plain modules: no adapter in the loop


def test_a_kohya_file_loads_as_the_same_lora_in_diffusers_layout(loras):
    assert next(iter(load_file(loras["kohya_a"]))).startswith("lora_")
    kohya, diffusers_layout = _outputs(_tiny((loras["kohya_a"], 0.8))), _outputs(_tiny((loras["a"], 0.8)))
    for from_kohya, from_diffusers in zip(kohya, diffusers_layout, strict=True):
        assert torch.allclose(from_kohya, from_diffusers, atol=1e-6, rtol=0)


def test_several_loras_add_up(loras):
    both = _outputs(_tiny((loras["a"], 0.5), (loras["b"], 0.5)))[0]
    plain = _outputs(build_tiny_random())[0]
    only_a, only_b = _outputs(_tiny((loras["a"], 0.5)))[0], _outputs(_tiny((loras["b"], 0.5)))[0]
    assert (both - only_a).abs().max() > 1e-3 and (both - only_b).abs().max() > 1e-3
    assert not torch.allclose(both, plain)


def test_the_cache_key_follows_the_files_content_and_scale_not_its_name(loras, tmp_path):
    from types import SimpleNamespace

    from diffferv_cli.config import ClipSpec, InversionConfig
    from diffferv_cli.editing.inversion import cache_request

    renamed = tmp_path / "another name.safetensors"
    shutil.copyfile(loras["a"], renamed)
    identity = {name: _tiny(*lora).identity for name, lora in {
        "a": [(loras["a"], 1.0)], "renamed": [(renamed, 1.0)], "half": [(loras["a"], 0.5)],
        "b": [(loras["b"], 1.0)], "none": []}.items()}
    assert identity["a"] == identity["renamed"]
    assert len({json.dumps(value) for value in identity.values()}) == 4
    assert identity["none"] == {"model": build_tiny_random().fingerprint}  # keys without a LoRA stay as they were

    geometry = SimpleNamespace(working_size=(64, 64))
    clip = SimpleNamespace(frames=torch.zeros(2, 64, 64, 3, dtype=torch.uint8).numpy(), spec=ClipSpec(),
                           frame_indices=[0, 1], geometry=geometry)
    with_lora, half = (cache_request(clip, _tiny(lora), InversionConfig()) for lora in ((loras["a"], 1.0),
                                                                                         (loras["a"], 0.5)))
    assert with_lora != half and with_lora["loras"] == identity["a"]["loras"]


# ---------------------------------------------------------------------------------------------- CLI


class Stop(Exception):
    pass


@pytest.fixture
def clip_file(tmp_path) -> Path:
    from media import make_test_clip

    return make_test_clip(tmp_path / "clip.mp4", width=64, height=64, frames=2, fps=24)


@pytest.mark.parametrize("command", [["invert"], ["edit", "--prompt-edit", "a photo of an old person"],
                                     ["reconstruct"]])
def test_lora_on_the_command_line_reaches_load_components(command, clip_file, loras, monkeypatch):
    import diffferv_cli.models.loading as loading

    seen = {}

    def load(model, **kwargs):
        seen.update(model=model, **kwargs)
        raise Stop

    monkeypatch.setattr(loading, "load_components", load)
    result = CliRunner().invoke(app, [command[0], str(clip_file), *command[1:], "--model", "tiny-random",
                                      "--size", "64", "--lora", f"{loras['a']}:0.5", "--lora", str(loras["b"])])
    assert isinstance(result.exception, Stop), result.output
    assert seen["model"] == "tiny-random"
    assert seen["loras"] == [(loras["a"], 0.5), (loras["b"], 1.0)]


def test_the_scale_is_the_text_after_the_last_colon_when_it_is_a_number():
    assert parse_lora("a.safetensors") == (Path("a.safetensors"), 1.0)
    assert parse_lora("dir/a.safetensors:-0.25") == (Path("dir/a.safetensors"), -0.25)
    assert parse_lora(r"C:\loras\a.safetensors") == (Path(r"C:\loras\a.safetensors"), 1.0)
    with pytest.raises(UserError, match="finite"):
        parse_lora("a.safetensors:nan")


def _not_a_lora(tmp_path: Path, kind: str) -> Path:
    if kind == "missing":
        return tmp_path / "missing.safetensors"
    if kind == "text":
        path = tmp_path / "notes.safetensors"
        path.write_text("just some text, not tensors\n")
        return path
    if kind == "checkpoint":  # a real safetensors file whose tensors are model weights, not a LoRA
        path = tmp_path / "model.safetensors"
        save_file({"conv_in.weight": torch.zeros(4, 4)}, path)
        return path
    folder = tmp_path / "empty-folder"
    folder.mkdir()
    return folder


@pytest.mark.parametrize("kind, fragment", [("missing", "does not exist"), ("text", "not a .safetensors file"),
                                            ("checkpoint", "'conv_in.weight' has no LoRA name"),
                                            ("folder", f"has no {LORA_FILE}")])
def test_a_file_that_is_not_a_lora_is_one_sentence_before_any_frame_is_decoded(kind, fragment, clip_file, tmp_path,
                                                                             monkeypatch):
    import diffferv_cli.video.io as video_io

    def no_decoding(*args, **kwargs):
        raise AssertionError("a frame was decoded")

    monkeypatch.setattr(video_io, "read_clip", no_decoding)
    result = CliRunner().invoke(app, ["invert", str(clip_file), "--model", "tiny-random", "--size", "64",
                                      "--lora", str(_not_a_lora(tmp_path, kind))])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.strip().splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and fragment in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output


def test_a_lora_of_another_model_is_one_sentence(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight": torch.ones(4, 320),
               "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.up.weight": torch.ones(320, 4)},
              path)
    with pytest.raises(UserError, match="does not fit the model tiny-random"):
        _tiny((path, 1.0))


# ------------------------------------------------------------------------------------------ training


def _train(tmp_path: Path, *args: str):
    from test_training import RESOLUTION, _folder

    faces = _folder(tmp_path / "faces", 4)
    return CliRunner().invoke(app, ["train", "--faces", str(faces), "--model", "tiny-random", "--steps", "2",
                                    "--batch-size", "2", "--resolution", str(RESOLUTION), "--workers", "0",
                                    "--cpu", "--lr", "1e-2", *args])


def test_train_lora_rank_writes_a_lora_that_lora_loads_and_that_changes_the_unet(tmp_path):
    out = tmp_path / "out"
    result = _train(tmp_path, "--out", str(out), "--lora-rank", "4")
    assert result.exit_code == 0, result.output
    assert f"--lora {out}" in " ".join(result.output.split())
    assert (out / LORA_FILE).is_file() and not (out / "unet").exists()  # the LoRA, not a whole model
    names = list(load_file(out / LORA_FILE))
    assert names and all(".lora." in name and name.startswith("unet.") for name in names)
    assert {name.split(".")[-4] for name in names} == {"to_q", "to_k", "to_v", "0"}  # to_out.0
    assert json.loads((out / "train_info.json").read_text())["lora"] == LORA_FILE

    trained, plain = _tiny((out, 1.0)), build_tiny_random()
    assert (_outputs(trained)[0] - _outputs(plain)[0]).abs().max() > 1e-4
    trained_weights, plain_weights = trained.unet.state_dict(), plain.unet.state_dict()
    changed = {name for name in plain_weights if not torch.equal(plain_weights[name], trained_weights[name])}
    assert changed and all(".attn" in name and name.endswith(".weight") for name in changed)  # projections only


def test_train_lora_resumes_to_the_same_lora(tmp_path):
    from test_training import RESOLUTION, _folder

    from diffferv_cli.config import TrainConfig
    from diffferv_cli.training.loop import train

    faces = _folder(tmp_path / "faces", 4)

    def config(out: Path, **changes) -> TrainConfig:
        return TrainConfig(**{**dict(faces=faces, out=out, steps=3, batch_size=2, resolution=RESOLUTION, lr=1e-2,
                                     checkpoint_every=1, workers=0, lora_rank=4), **changes})

    train(build_tiny_random(), config(tmp_path / "whole"), cpu=True)

    def stop_after_two(step: int) -> None:
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(UserError, match="Interrupted after step 2"):
        train(build_tiny_random(), config(tmp_path / "split"), cpu=True, on_step=stop_after_two)
    checkpoint = load_file(tmp_path / "split" / "checkpoints" / "step-0000002" / "unet.safetensors")
    assert checkpoint and all(".lora_" in name for name in checkpoint)  # the base is --model's, not stored
    with pytest.raises(UserError, match="trained a LoRA of rank 4; resume with --lora-rank 4"):
        train(build_tiny_random(), config(tmp_path / "split", resume="latest", lora_rank=None), cpu=True)
    train(build_tiny_random(), config(tmp_path / "split", resume="latest"), cpu=True)
    whole, split = load_file(tmp_path / "whole" / LORA_FILE), load_file(tmp_path / "split" / LORA_FILE)
    assert whole.keys() == split.keys() and all(torch.equal(whole[name], split[name]) for name in whole)


def test_train_lora_refuses_ema_in_one_sentence(tmp_path):
    result = _train(tmp_path, "--out", str(tmp_path / "out"), "--lora-rank", "4", "--ema")
    assert result.exit_code == 2, result.output
    assert "--ema cannot be used with --lora-rank" in " ".join(result.output.split())
