"""Specialization stage: data, sample plan, augmentation, training loop, resume, export, captions."""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from diffferv_cli.cli import app
from diffferv_cli.config import TrainConfig
from diffferv_cli.errors import UserError
from diffferv_cli.models.tiny import build_tiny_random
from diffferv_cli.training.data import (
    SamplePlan,
    TrainSamples,
    collate,
    decode_image,
    resize_crop,
    scan_images,
    to_tensor,
)
from diffferv_cli.training.loop import TrainingInterrupted, _diffusion_loss, train

RESOLUTION = 32  # the tiny VAE downsamples by 8: 4x4 latents


def _image(seed: int, height: int = 48, width: int = 40) -> np.ndarray:
    """A smooth, structured RGB image (gradients + a disc), different per seed."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    image = np.stack([xs * 255 // width, ys * 255 // height, np.full_like(xs, rng.integers(0, 255))], -1)
    image = np.ascontiguousarray(image, dtype=np.uint8)
    cv2.circle(image, (int(rng.integers(8, width - 8)), int(rng.integers(8, height - 8))), 7,
               tuple(int(v) for v in rng.integers(0, 255, 3)), -1)
    return image


def _folder(root: Path, count: int, captions: bool | int = True, seed: int = 0, size=(48, 40)) -> Path:
    """`count` PNG images; sidecar captions for all (True), none (False) or the first n (int)."""
    root.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        cv2.imwrite(str(root / f"img{index:02d}.png"), np.ascontiguousarray(_image(seed + index, *size)[..., ::-1]))
        if captions is True or (captions is not False and index < captions):
            (root / f"img{index:02d}.txt").write_text(f"a photo of person number {index}\n")
    return root


def _config(tmp_path: Path, faces: Path, **changes) -> TrainConfig:
    settings = dict(faces=faces, out=tmp_path / "out", steps=6, batch_size=2, resolution=RESOLUTION, lr=1e-3,
                    checkpoint_every=0, workers=0, max_grad_norm=None)
    return TrainConfig(**{**settings, **changes})


def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


# ------------------------------------------------------------------------------------------- data


def test_sidecar_manifest_and_tar_layouts_give_the_same_items(tmp_path):
    faces = _folder(tmp_path / "faces", 3)
    sidecar = scan_images(faces)
    assert [item.caption for item in sidecar.items] == [f"a photo of person number {i}" for i in range(3)]

    bare = _folder(tmp_path / "bare", 3, captions=False)
    (tmp_path / "captions.jsonl").write_text(
        "".join(json.dumps({"file": f"img{i:02d}.png", "text": f"caption {i}"}) + "\n" for i in range(3)))
    (tmp_path / "captions.csv").write_text("file,text\n" + "".join(f"img{i:02d}.png,caption {i}\n" for i in range(3)))
    for manifest in ("captions.jsonl", "captions.csv"):
        listed = scan_images(bare, tmp_path / manifest)
        assert [item.caption for item in listed.items] == [f"caption {i}" for i in range(3)]

    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "000000.tar", "w") as tar:
        for index in range(3):
            png = cv2.imencode(".png", np.ascontiguousarray(_image(index)[..., ::-1]))[1].tobytes()
            for name, data in ((f"sample{index}.png", png), (f"sample{index}.txt", f"tar caption {index}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    streamed = scan_images(shards)
    assert [item.caption for item in streamed.items] == [f"tar caption {i}" for i in range(3)]
    for index, item in enumerate(streamed.items):  # read by offset from the shard, nothing unpacked
        assert np.array_equal(decode_image(item.read_bytes()), _image(index))
    assert sorted(p.name for p in shards.iterdir()) == ["000000.tar"]


def test_sample_plan_keeps_the_prior_share_and_walks_epochs():
    plan = SamplePlan(faces=50, prior=20, prior_ratio=0.1, seed=3)
    draws = [plan(n) for n in range(10_000)]
    share = sum(d.prior for d in draws) / len(draws)
    print(f"prior share over 10000 samples: {share:.4f} (asked 0.1)")
    assert abs(share - 0.1) <= 0.001
    for start in range(0, 10_000 - 80, 80):  # every 10 batches of 8: 8 prior pairs, +-1
        assert abs(sum(d.prior for d in draws[start:start + 80]) - 8) <= 1
    faces = [d.index for d in draws if not d.prior]
    assert sorted(faces[:50]) == list(range(50)) and sorted(faces[50:100]) == list(range(50))
    assert faces[:50] != faces[50:100]  # a new order each epoch
    assert [plan(n) for n in (5, 999, 42)] == [draws[5], draws[999], draws[42]]  # pure function of n
    assert not any(d.prior for d in (SamplePlan(5, 0, 0.1, 0)(n) for n in range(100)))  # no prior set


def test_augmentation_applies_to_faces_only_and_keeps_images_valid(tmp_path):
    faces, prior = scan_images(_folder(tmp_path / "f", 4)), scan_images(_folder(tmp_path / "p", 4, seed=10))
    dataset = TrainSamples(faces, prior, length=200, resolution=RESOLUTION, prior_ratio=0.25, seed=0,
                           max_zoom=1.5, max_rotation=20.0, center_crop=True)
    seen_prior = seen_faces = 0
    for n in range(40):
        sample, draw = dataset[n], dataset.plan(n)
        pixels = sample["pixels"]
        assert pixels.shape == (3, RESOLUTION, RESOLUTION) and pixels.dtype == torch.float32
        assert torch.isfinite(pixels).all() and pixels.min() >= -1.0 and pixels.max() <= 1.0
        pool = prior if draw.prior else faces
        plain = to_tensor(resize_crop(decode_image(pool.items[draw.index].read_bytes()), RESOLUTION, None))
        zoom, degrees = sample["augment"]
        if draw.prior:
            seen_prior += 1
            assert (zoom, degrees) == (1.0, 0.0) and torch.equal(pixels, plain)
        else:
            seen_faces += 1
            assert 1.0 <= zoom <= 1.5 and abs(degrees) <= 20.0
            assert not torch.equal(pixels, plain)
            assert (pixels - plain).abs().mean() < 0.5  # the same picture, moved a little
    assert seen_prior == 10 and seen_faces == 30
    again = TrainSamples(faces, prior, length=200, resolution=RESOLUTION, prior_ratio=0.25, seed=0,
                         max_zoom=1.5, max_rotation=20.0, center_crop=True)
    assert torch.equal(again[7]["pixels"], dataset[7]["pixels"])  # deterministic


def test_unreadable_images_are_skipped_and_counted(tmp_path):
    faces = _folder(tmp_path / "faces", 3)
    (faces / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (faces / "broken.txt").write_text("a photo of nothing")
    images = scan_images(faces)
    dataset = TrainSamples(images, None, length=8, resolution=RESOLUTION, prior_ratio=0.0, seed=0,
                           max_zoom=1.0, max_rotation=0.0, center_crop=True)
    batch = collate([dataset[n] for n in range(8)])
    assert set(batch["skipped"]) == {"broken.png"}
    assert batch["pixels"].shape == (8, 3, RESOLUTION, RESOLUTION)
    reports = []
    result = train(build_tiny_random(0), _config(tmp_path, faces, steps=2, batch_size=4, grad_accum=2, lr=2e-3),
                   progress=reports.append)
    assert result.skipped == ["broken.png"]
    # one report per optimizer step: samples seen (batch 4 x accumulation 2 per step), distinct images skipped
    assert [(r.step, r.total, r.samples, r.skipped, r.lr) for r in reports] == [(1, 2, 8, 1, 2e-3), (2, 2, 16, 1, 2e-3)]
    assert [r.loss for r in reports] == result.losses


class _RecordingTokenizer:
    """The tokenizer, noting every caption it is asked to encode."""

    def __init__(self, tokenizer):
        self._tokenizer, self.seen = tokenizer, []

    def __call__(self, text, *args, **kwargs):
        self.seen += [text] if isinstance(text, str) else list(text)
        return self._tokenizer(text, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


@pytest.mark.parametrize("ratio, expected_prior", [(0.25, 2), (0.0, 0)])
def test_training_draws_the_prior_share_from_the_prior_set(tmp_path, ratio, expected_prior):
    """4 steps of batch 2 = 8 samples: floor(8 * ratio) of them are --prior pairs, with their captions."""
    from dataclasses import replace

    faces = _folder(tmp_path / "faces", 3)
    prior = _folder(tmp_path / "prior", 3, captions=False, seed=20)
    for index in range(3):
        (prior / f"img{index:02d}.txt").write_text(f"a general picture {index}\n")
    base = build_tiny_random(0)
    recording = _RecordingTokenizer(base.tokenizer)
    result = train(replace(base, tokenizer=recording),
                   _config(tmp_path, faces, steps=4, batch_size=2, prior=prior, prior_ratio=ratio))
    assert result.steps == 4 and len(recording.seen) == 8
    assert sum(caption.startswith("a general picture") for caption in recording.seen) == expected_prior
    assert sum(caption.startswith("a photo of person number") for caption in recording.seen) == 8 - expected_prior


# ------------------------------------------------------------------------------------------- loop


def _fixed_loss(components, faces: Path) -> float:
    """Diffusion loss on the 4 images (no augmentation) with fixed noise and timesteps."""
    from diffusers import DDPMScheduler

    dataset = TrainSamples(scan_images(faces), None, length=4, resolution=RESOLUTION, prior_ratio=0.0, seed=0,
                           max_zoom=1.0, max_rotation=0.0, center_crop=True)
    batch = collate([dataset[n] for n in range(4)])
    scheduler = DDPMScheduler.from_config(components.scheduler_config)
    with torch.no_grad():
        losses = [_diffusion_loss(batch, components.unet, components.vae, components.text_encoder,
                                  components.tokenizer, scheduler, 0.18215, torch.float32, torch.device("cpu"),
                                  torch.Generator().manual_seed(seed)).item() for seed in range(16)]
    return float(np.mean(losses))


def test_loss_goes_down_when_overfitting_four_images(tmp_path):
    faces = _folder(tmp_path / "faces", 4)
    components = build_tiny_random(0)
    before = _fixed_loss(components, faces)
    result = train(components, _config(tmp_path, faces, steps=40, batch_size=4, max_zoom=1.0, max_rotation=0.0,
                                       center_crop=True))
    after = _fixed_loss(components, faces)
    print(f"fixed-noise loss before {before:.4f}, after 40 steps {after:.4f}; "
          f"batch loss first 5 {np.mean(result.losses[:5]):.4f}, last 5 {np.mean(result.losses[-5:]):.4f}")
    assert result.steps == 40 and len(result.losses) == 40
    assert after < 0.7 * before


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    faces = _folder(tmp_path / "faces", 4)
    settings = dict(steps=6, grad_accum=2, checkpoint_every=2, keep_checkpoints=0, ema=True, ema_decay=0.9)

    whole = build_tiny_random(0)
    train(whole, _config(tmp_path / "a", faces, **settings))
    expected = _weights(whole.unet)

    def stop_after_5(step: int) -> None:
        if step == 5:
            raise KeyboardInterrupt

    out = tmp_path / "b" / "out"
    with pytest.raises(TrainingInterrupted, match="after step 5"):
        train(build_tiny_random(0), _config(tmp_path / "b", faces, **settings), on_step=stop_after_5)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000002", "step-0000004", "step-0000005"]
    assert not (out / "model_index.json").exists()

    # the files of the old pickle-based layout, planted with a payload: a resume must never unpickle them
    marker = tmp_path / "pickle-ran"
    for checkpoint in (out / "checkpoints").iterdir():
        for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "scheduler.bin",
                     "pytorch_model.bin", "model.safetensors.pkl"):
            (checkpoint / name).write_bytes(_payload(marker))
    for resume in ("latest", str(out / "checkpoints" / "step-0000002")):
        resumed = build_tiny_random(0)
        result = train(resumed, _config(tmp_path / "b", faces, **settings, resume=resume))
        assert result.resumed_from == (5 if resume == "latest" else 2)
        got = _weights(resumed.unet)
        assert all(torch.equal(got[name], expected[name]) for name in expected), resume
    assert not marker.exists()


def test_a_run_stopped_after_its_last_step_resumes_to_the_export(tmp_path):
    """Ctrl-C after the last optimizer step (before the export) leaves a checkpoint of that step; resuming
    it runs no step and exports the same weights and step count as an uninterrupted run."""
    faces = _folder(tmp_path / "faces", 2)
    whole = build_tiny_random(0)
    train(whole, _config(tmp_path / "a", faces, steps=2))

    def stop_at_the_end(step: int) -> None:
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted, match="after step 2 of 2"):
        train(build_tiny_random(0), _config(tmp_path / "b", faces, steps=2), on_step=stop_at_the_end)
    resumed = build_tiny_random(0)
    result = train(resumed, _config(tmp_path / "b", faces, steps=2, resume="latest"))
    assert (result.resumed_from, result.steps, result.losses) == (2, 2, [])
    assert json.loads((tmp_path / "b" / "out" / "train_info.json").read_text())["steps"] == 2
    expected = _weights(whole.unet)
    assert all(torch.equal(value, expected[name]) for name, value in _weights(resumed.unet).items())


@pytest.mark.parametrize("precision, stops", [("fp16", False), ("bf16", True), ("no", True)])
def test_a_non_finite_loss_stops_the_run_except_under_fp16_loss_scaling(tmp_path, precision, stops):
    """fp16's grad scaler skips a step whose loss overflowed and lowers its scale: not a divergence."""
    from types import SimpleNamespace

    from diffferv_cli.training.loop import TrainResult, _after_step

    cfg = _config(tmp_path, tmp_path, mixed_precision=precision)
    run = SimpleNamespace(accelerator=None, cfg=cfg, ema=None)
    result = TrainResult(out=tmp_path, steps=1, losses=[float("inf")])
    if stops:
        with pytest.raises(UserError, match="diverged at step 1 .*--lr"):
            _after_step(run, 1, result, 0, None)
    else:
        assert _after_step(run, 1, result, 0, None) is False


class _Payload:
    """Unpickling this creates a file: proof that a pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _payload(marker: Path) -> bytes:
    import pickle

    return pickle.dumps(_Payload(marker))


def test_checkpoint_holds_no_pickle_and_old_or_tampered_ones_are_refused(tmp_path):
    faces = _folder(tmp_path / "faces", 2)
    train(build_tiny_random(0), _config(tmp_path, faces, steps=3, checkpoint_every=2, ema=True))
    checkpoint = tmp_path / "out" / "checkpoints" / "step-0000002"
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        "ema.json", "ema.safetensors", "lr_scheduler.json", "optimizer.json", "optimizer.safetensors",
        "train_state.json", "unet.safetensors"]
    for path in checkpoint.iterdir():  # JSON or safetensors, nothing else
        data = path.read_bytes()
        assert path.suffix == ".json" and json.loads(data) is not None or data[8:9] == b"{", path

    def resume_with(**changes) -> None:
        state = json.loads((checkpoint / "train_state.json").read_text())
        (checkpoint / "train_state.json").write_text(json.dumps({**state, **changes}))
        train(build_tiny_random(0), _config(tmp_path, faces, steps=4, ema=True, resume=str(checkpoint)))

    original = (checkpoint / "train_state.json").read_text()
    with pytest.raises(UserError, match="older format"):
        resume_with(format=1)
    for bad in (dict(step="2"), dict(step=None), dict(seed=[0]), dict(fingerprint=5)):
        (checkpoint / "train_state.json").write_text(original)
        with pytest.raises(UserError, match="unreadable train_state.json"):
            resume_with(**bad)
    (checkpoint / "train_state.json").write_text(original)
    (checkpoint / "ema.json").write_text(json.dumps({"dict": [["decay", {"object": "os.system"}]]}))
    with pytest.raises(UserError, match="cannot be loaded"):
        resume_with()


def test_a_diverging_run_stops_and_exports_nothing(tmp_path, monkeypatch):
    from diffferv_cli.training import loop

    real_loss = loop._diffusion_loss
    monkeypatch.setattr(loop, "_diffusion_loss", lambda *args: real_loss(*args) * float("nan"))
    faces = _folder(tmp_path / "faces", 2)
    with pytest.raises(UserError, match="diverged at step 1 .*--lr"):
        train(build_tiny_random(0), _config(tmp_path, faces, steps=3))
    assert not (tmp_path / "out" / "model_index.json").exists()
    assert not (tmp_path / "out" / "train_info.json").exists()


def test_exported_folder_loads_with_model_and_runs_edit(tmp_path):
    from media import make_test_clip

    from diffferv_cli.models.loading import load_components
    from diffferv_cli.video.probe import probe

    faces = _folder(tmp_path / "faces", 4)
    out = tmp_path / "model"
    run = CliRunner().invoke(app, ["train", "--faces", str(faces), "--out", str(out), "--model", "tiny-random",
                                   "--steps", "3", "--batch-size", "2", "--resolution", str(RESOLUTION),
                                   "--lr", "1e-3", "--workers", "0", "--cpu", "--validate-every", "3",
                                   "--validation-prompt", "a photo of an old person"])
    assert run.exit_code == 0, run.output
    assert "Trained 3 steps" in run.output
    assert (out / "validation" / "step-0000003" / "00.png").is_file()
    info = json.loads((out / "train_info.json").read_text())
    assert info["steps"] == 3 and info["base_model"] == "tiny-random"

    loaded = load_components(str(out), device="cpu", dtype="fp32")
    base = build_tiny_random(0)
    assert any(not torch.equal(a, b) for a, b in zip(loaded.unet.state_dict().values(),
                                                     base.unet.state_dict().values(), strict=True))

    clip = make_test_clip(tmp_path / "clip.mp4", width=96, height=64, frames=4, fps=24, audio=False)
    edited = tmp_path / "edited.mp4"
    result = CliRunner().invoke(app, ["edit", str(clip), "--preset", "age", "--model", str(out), "--size", "64",
                                      "--steps", "2", "--frames", "3", "--flow-preset", "ultrafast", "--cache-dir",
                                      str(tmp_path / "cache"), "-o", str(edited), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert probe(edited).frame_count == 3


def test_a_mixed_precision_run_exports_float32_weights(tmp_path):
    """bf16 training (the CPU's mixed precision) runs the frozen VAE and text encoder in bf16 and keeps the
    trained UNet's weights in float32; the exported model is float32 throughout, as the base model was."""
    from safetensors import safe_open

    faces = _folder(tmp_path / "faces", 2)
    components = build_tiny_random(0)
    during = []
    train(components, _config(tmp_path, faces, steps=1, mixed_precision="bf16"),
          on_step=lambda step: during.append((components.vae.dtype, components.text_encoder.dtype,
                                              components.unet.dtype)))
    assert during == [(torch.bfloat16, torch.bfloat16, torch.float32)]
    files = sorted((tmp_path / "out").rglob("*.safetensors"))
    assert {path.parent.name for path in files} == {"unet", "vae", "text_encoder"}
    for path in files:
        with safe_open(str(path), framework="pt") as weights:
            dtypes = {weights.get_slice(name).get_dtype() for name in weights.keys()}
        assert dtypes == {"F32"}, (path, dtypes)


def _pipeline_images(model: Path, prompts, *, seed: int, steps: int, guidance: float, size: int) -> list[np.ndarray]:
    """What diffusers' own pipeline samples from the model folder `model`, seeded per prompt like validation."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from diffferv_cli.models.loading import load_components

    loaded = load_components(str(model), device="cpu", dtype="fp32")
    pipe = StableDiffusionPipeline(vae=loaded.vae, text_encoder=loaded.text_encoder, tokenizer=loaded.tokenizer,
                                   unet=loaded.unet, scheduler=DDIMScheduler.from_config(loaded.scheduler_config),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return [np.asarray(pipe(prompt, height=size, width=size, num_inference_steps=steps, guidance_scale=guidance,
                            generator=torch.Generator().manual_seed(seed + index)).images[0])
            for index, prompt in enumerate(prompts)]


def test_validation_images_are_the_pipeline_samples_of_the_validated_weights(tmp_path):
    """At the last step, validation samples the EMA weights that are then exported: each image is what
    diffusers' pipeline gives for its prompt with the run's seed + index, steps, guidance and resolution
    (none of them the pipeline's default: 64 px for the tiny model, 50 steps, guidance 7.5)."""
    faces = _folder(tmp_path / "faces", 2)
    prompts = ("a photo of an old person", "a photo of a person with glasses")
    cfg = _config(tmp_path, faces, steps=2, ema=True, ema_decay=0.5, validate_every=2, validation_prompts=prompts,
                  validation_steps=3, validation_guidance=3.0, seed=11)
    train(build_tiny_random(0), cfg)
    folder = tmp_path / "out" / "validation" / "step-0000002"
    assert sorted(p.name for p in folder.iterdir()) == ["00.png", "01.png", "prompts.txt"]
    assert (folder / "prompts.txt").read_text().splitlines() == list(prompts)
    expected = _pipeline_images(tmp_path / "out", prompts, seed=11, steps=3, guidance=3.0, size=RESOLUTION)
    for index, want in enumerate(expected):
        got = cv2.imread(str(folder / f"{index:02d}.png"))[..., ::-1]
        assert got.shape == (RESOLUTION, RESOLUTION, 3)
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1, index
    assert np.abs(expected[0].astype(int) - expected[1].astype(int)).max() > 8  # the prompts and seeds differ


def test_validation_leaves_the_trained_weights_as_they_would_be_without_it(tmp_path):
    """Validating mid-run swaps the EMA weights in and back out: the run goes on from its own weights."""
    faces = _folder(tmp_path / "faces", 2)
    settings = dict(steps=3, ema=True, ema_decay=0.5, validation_prompts=("a face",), validation_steps=2)
    weights = []
    for every in (0, 1):
        components = build_tiny_random(0)
        train(components, _config(tmp_path / f"every{every}", faces, validate_every=every, **settings))
        weights.append(_weights(components.unet))
    assert (tmp_path / "every1" / "out" / "validation" / "step-0000001" / "00.png").is_file()
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])


# ------------------------------------------------------------------------------------- bad input


def _train_cli(*args: str):
    return CliRunner().invoke(app, ["train", "--model", "tiny-random", "--steps", "2", "--batch-size", "2",
                                    "--resolution", str(RESOLUTION), "--workers", "0", "--cpu", *args])


def _one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.output
    for fragment in fragments:
        assert fragment in " ".join(result.output.split()), result.output


def test_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    _one_line_error(_train_cli("--faces", str(tmp_path / "empty"), "--out", str(tmp_path / "out")), "No images found")
    assert not (tmp_path / "out").exists()


def test_missing_captions_say_how_many_and_which_option_fixes_it(tmp_path):
    faces = _folder(tmp_path / "faces", 5, captions=2)
    _one_line_error(_train_cli("--faces", str(faces), "--out", str(tmp_path / "out")),
                    "3 of 5 images", "--captions", "diffferv caption")


def test_unwritable_out_is_a_clear_error(tmp_path):
    faces = _folder(tmp_path / "faces", 2)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    _one_line_error(_train_cli("--faces", str(faces), "--out", str(blocker / "model")), "Cannot write",
                    "(Not a directory).")
    _one_line_error(_train_cli("--faces", str(faces), "--out", str(blocker)), "is a file")


def test_fp16_on_the_cpu_is_a_clear_error(tmp_path):
    faces = _folder(tmp_path / "faces", 2)
    _one_line_error(_train_cli("--faces", str(faces), "--out", str(tmp_path / "out"), "--mixed-precision", "fp16"),
                    "needs a GPU")


def test_8bit_adam_without_bitsandbytes_says_which_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not installed, wherever the suite runs
    faces = _folder(tmp_path / "faces", 2)
    result = _train_cli("--faces", str(faces), "--out", str(tmp_path / "out"), "--8bit-adam")
    _one_line_error(result)
    assert result.output.splitlines()[-1] == "Error: --8bit-adam needs the bitsandbytes package (pip install bitsandbytes)."


def test_non_empty_out_needs_resume(tmp_path):
    faces = _folder(tmp_path / "faces", 2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _one_line_error(_train_cli("--faces", str(faces), "--out", str(out)), "not empty", "--resume latest")
    assert (out / "keep.txt").read_text() == "mine"
    _one_line_error(_train_cli("--faces", str(faces), "--out", str(tmp_path / "new"), "--resume", "latest"),
                    "no checkpoint")


def test_resume_from_a_checkpoint_of_another_model_is_refused(tmp_path):
    faces = _folder(tmp_path / "faces", 2)
    train(build_tiny_random(0), _config(tmp_path, faces, steps=2, checkpoint_every=1))
    with pytest.raises(UserError, match="trained from model"):
        train(build_tiny_random(seed=1), _config(tmp_path, faces, steps=4, resume="latest"))
    with pytest.raises(UserError, match="other settings"):
        train(build_tiny_random(0), _config(tmp_path, faces, steps=4, batch_size=1, resume="latest"))


# ---------------------------------------------------------------------------------------- captions


@pytest.fixture(scope="module")
def tiny_captioner(tmp_path_factory) -> Path:
    """A random-weight BLIP captioner with a 20-word vocabulary, saved as a local folder (offline)."""
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipProcessor
    from transformers.models.blip import BlipImageProcessor

    folder = tmp_path_factory.mktemp("blip")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"a photo of the person man woman with smiling hair "
             "glasses young old face beard blond".split()]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    torch.manual_seed(0)
    config = BlipConfig(
        text_config=dict(vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=37, max_position_embeddings=64, bos_token_id=2, sep_token_id=3,
                         pad_token_id=0),
        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                           image_size=32, patch_size=8),
        projection_dim=32)
    BlipForConditionalGeneration(config).save_pretrained(folder)
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                  tokenizer=BertTokenizer(str(folder / "vocab.txt"))).save_pretrained(folder)
    return folder


def test_caption_writes_sidecar_captions_that_train_reads(tmp_path, tiny_captioner):
    faces = _folder(tmp_path / "faces", 3, captions=1)
    (faces / "img00.txt").write_text("my own caption\n")
    result = CliRunner().invoke(app, ["caption", str(faces), "--model", str(tiny_captioner), "--device", "cpu",
                                      "--max-new-tokens", "6"])
    assert result.exit_code == 0, result.output
    assert "Captions written: 2; kept (already captioned): 1" in result.output
    assert (faces / "img00.txt").read_text() == "my own caption\n"
    for name in ("img01.txt", "img02.txt"):
        text = (faces / name).read_text().strip()
        assert text.startswith("a photo of") and len(text.split()) > 3
    assert len(scan_images(faces)) == 3


def test_caption_with_an_unavailable_model_is_a_clear_error(tmp_path):
    faces = _folder(tmp_path / "faces", 1, captions=False)
    _one_line_error(CliRunner().invoke(app, ["caption", str(faces), "--model", str(tmp_path / "no-such-model")]),
                    "cannot be loaded")


@pytest.fixture(scope="module")
def tiny_chat_captioner(tmp_path_factory) -> Path:
    """A random-weight LLaVA (the Pixtral family's layout) with a word-level tokenizer and a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )
    from transformers.models.clip import CLIPImageProcessor

    folder = tmp_path_factory.mktemp("llava")
    words = ["<pad>", "<unk>", "<s>", "</s>", "<image>", *"a photo of the person man woman with smiling hair "
             "glasses young old face beard blond user assistant : write one short caption".split()]
    word_level = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="<unk>", pad_token="<pad>",
                                        bos_token="<s>", eos_token="</s>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    template = ("{% for m in messages %}{{ m['role'] }} : {% for c in m['content'] %}{% if c['type'] == 'image' %}"
                "<image> {% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}"
                "{% if add_generation_prompt %}assistant : {% endif %}")
    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                                       image_size=32, patch_size=8, projection_dim=32),
        text_config=LlamaConfig(vocab_size=len(words), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                                pad_token_id=0, bos_token_id=2, eos_token_id=3),
        image_token_index=4, vision_feature_layer=-1, vision_feature_select_strategy="default")
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                   tokenizer=tokenizer, chat_template=template, patch_size=8, vision_feature_select_strategy="default",
                   num_additional_image_tokens=1).save_pretrained(folder)
    return folder


def test_caption_with_a_chat_model_writes_only_the_answer(tmp_path, tiny_chat_captioner):
    faces = _folder(tmp_path / "faces", 2, captions=False)
    result = CliRunner().invoke(app, ["caption", str(faces), "--model", str(tiny_chat_captioner), "--device", "cpu",
                                      "--max-new-tokens", "5"])
    assert result.exit_code == 0, result.output
    assert "Captions written: 2" in result.output
    for name in ("img00.txt", "img01.txt"):
        text = (faces / name).read_text().strip()
        assert text and "user" not in text and "<image>" not in text and "assistant" not in text
    assert len(scan_images(faces)) == 2


def test_a_v_prediction_base_trains_toward_v_and_exports_its_own_schedule(tmp_path, monkeypatch):
    """The loss target follows the base model's prediction type (v = sqrt(a) eps - sqrt(1 - a) x0 for a
    v model, not the noise), and the exported folder keeps the base's scheduler config."""
    from dataclasses import replace

    from diffusers import DDPMScheduler

    from diffferv_cli.models.families import SD15_SCHEDULER
    from diffferv_cli.models.loading import load_components

    velocities = []
    real_velocity = DDPMScheduler.get_velocity

    def recording(self, sample, noise, timesteps):
        velocities.append(self.config.prediction_type)
        return real_velocity(self, sample, noise, timesteps)

    monkeypatch.setattr(DDPMScheduler, "get_velocity", recording)
    faces = _folder(tmp_path / "faces", 4)
    schedule = {**SD15_SCHEDULER, "prediction_type": "v_prediction", "timestep_spacing": "trailing", "steps_offset": 0}
    train(replace(build_tiny_random(0), scheduler_config=schedule), _config(tmp_path, faces, steps=2, batch_size=2))
    assert velocities == ["v_prediction", "v_prediction"]  # one target per step, a velocity
    exported = load_components(str(tmp_path / "out"), device="cpu", dtype="fp32").scheduler_config
    assert (exported["prediction_type"], exported["timestep_spacing"]) == ("v_prediction", "trailing")
    velocities.clear()
    train(build_tiny_random(0), _config(tmp_path / "eps", faces, steps=1, batch_size=2))
    assert velocities == []  # a noise-predicting base trains toward the noise
