"""Every model is inverted and edited with its own noise schedule: prediction type, timestep spacing,
zero terminal SNR. The UNet is replaced by an exact-prediction stub (it returns the true epsilon, or the
true v, of the latent it is fed for the known x_0), so DDIM inversion followed by DDIM sampling must come
back to x_0 -- and does not when the prediction is read as the wrong type."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from diffferv_cli.config import DEFAULT_SOURCE_PROMPT, ClipSpec, EditConfig, InversionConfig
from diffferv_cli.editing.inversion import cache_request, invert
from diffferv_cli.editing.sampling import edit
from diffferv_cli.errors import UserError
from diffferv_cli.models.families import SD15_SCHEDULER, ddim_config, key_of

STEPS = 5
SPEC = ClipSpec(short_side=32, multiple=16, frames=2)
SCHEDULES = {
    "epsilon": dict(SD15_SCHEDULER),
    "v_prediction": {**SD15_SCHEDULER, "prediction_type": "v_prediction"},
    "sample": {**SD15_SCHEDULER, "prediction_type": "sample"},
    "trailing": {**SD15_SCHEDULER, "timestep_spacing": "trailing", "steps_offset": 0},
    "zero_snr_v": {**SD15_SCHEDULER, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
                   "timestep_spacing": "trailing", "steps_offset": 0},
}


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    from media import make_test_clip

    from diffferv_cli.video.io import read_clip

    path = make_test_clip(tmp_path_factory.mktemp("clip") / "clip.mp4", width=48, height=32, frames=2, fps=24)
    return read_clip(path, SPEC)


class ExactPrediction:
    """Forward hook: the UNet's output becomes the true `kind` (epsilon, v_prediction or sample) of each
    row for the clean latent x_0 of its frame, at the noise level the latent is at. Sampling feeds x_t with
    the label t; DDIM inversion feeds z at the label of the step it moves to, one step (`shift`
    timesteps) above the level z is at (below the first timestep: the scheduler's initial alpha-bar)."""

    def __init__(self, scheduler: DDIMScheduler, kind: str):
        config = scheduler.config
        self.alphas, self.kind, self.x0, self.shift = scheduler.alphas_cumprod, kind, None, 0
        self.initial = torch.tensor(1.0) if config.set_alpha_to_one else self.alphas[0]
        self.step = config.num_train_timesteps // STEPS

    def __call__(self, module, args, kwargs, output):
        latents = (args[0] if args else kwargs["sample"]).float()
        timestep = int(args[1] if len(args) > 1 else kwargs["timestep"]) - self.shift
        x0 = self.x0.repeat(latents.shape[0] // len(self.x0), 1, 1, 1)
        alpha = self.alphas[timestep] if timestep >= 0 else self.initial
        eps = (latents - alpha.sqrt() * x0) / (1 - alpha).sqrt()
        truth = {"epsilon": eps, "sample": x0, "v_prediction": alpha.sqrt() * eps - (1 - alpha).sqrt() * x0}
        return UNet2DConditionOutput(sample=truth[self.kind].to(output.sample.dtype))


def _round_trip(tiny, clip, tmp_path, schedule: dict, predicts: str):
    """Invert and reconstruct (plain DDIM, no injection) with the exact stub; (cached latents, x_0, result)."""
    model = replace(tiny, scheduler_config=ddim_config(schedule))
    stub = ExactPrediction(DDIMScheduler.from_config(model.scheduler_config), predicts)
    stub.shift = stub.step  # inversion
    handle = tiny.unet.register_forward_hook(stub, with_kwargs=True)
    try:
        from diffferv_cli.editing import inversion

        original = inversion.encode_frames

        def encode_and_remember(*args, **kwargs):
            stub.x0 = original(*args, **kwargs)
            return stub.x0

        inversion.encode_frames = encode_and_remember
        try:
            entry = invert(model, clip, InversionConfig(steps=STEPS, flow_preset="ultrafast"), cache_dir=tmp_path).entry
        finally:
            inversion.encode_frames = original
        stub.shift = 0  # sampling
        result = edit(model, entry, EditConfig(prompt_edit=DEFAULT_SOURCE_PROMPT, inject=False), decode=False)
    finally:
        handle.remove()
    latents = [entry.read_latent(step) for step in range(STEPS + 1)]
    return model, latents, stub.x0, result.latents


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_inversion_and_sampling_are_diffusers_ddim_under_the_models_own_schedule(tiny, clip, tmp_path, name):
    predicts = SCHEDULES[name].get("prediction_type", "epsilon")
    model, latents, x0, result = _round_trip(tiny, clip, tmp_path, SCHEDULES[name], predicts)
    stub = ExactPrediction(DDIMScheduler.from_config(model.scheduler_config), predicts)
    stub.x0, stub.shift = x0, stub.step
    inverse = DDIMInverseScheduler.from_config(model.scheduler_config)
    inverse.set_timesteps(STEPS)
    z = x0
    for step, timestep in enumerate(inverse.timesteps):  # diffusers' own inversion, step by step
        prediction = stub(None, (z, timestep), {}, UNet2DConditionOutput(sample=z)).sample
        z = inverse.step(prediction, timestep, z).prev_sample
        assert torch.allclose(latents[step + 1], z, rtol=1e-5, atol=1e-5), (name, step)
    forward = DDIMScheduler.from_config(model.scheduler_config)
    forward.set_timesteps(STEPS)
    assert [int(t) for t in forward.timesteps] == [int(t) for t in inverse.timesteps.flip(0)]
    x, stub.shift = latents[-1], 0
    for timestep in forward.timesteps:  # and diffusers' own sampling
        x = forward.step(stub(None, (x, timestep), {}, UNet2DConditionOutput(sample=x)).sample, timestep, x).prev_sample
    assert torch.allclose(result, x, rtol=1e-4, atol=1e-4), name
    assert torch.allclose(result, x0, rtol=1e-4, atol=1e-4), name  # exact predictions come back to x_0


def test_a_v_prediction_model_read_as_epsilon_does_not_come_back(tiny, clip, tmp_path):
    _, _, x0, result = _round_trip(tiny, clip, tmp_path, SCHEDULES["epsilon"], "v_prediction")
    assert (result - x0).abs().max() > 0.1 * x0.abs().max()  # 10 % off where the right reading is 1e-4


@pytest.mark.parametrize("name", ["trailing", "zero_snr_v"])
def test_trailing_schedules_start_from_the_last_training_timestep(name):
    scheduler = DDIMScheduler.from_config(ddim_config(SCHEDULES[name]))
    scheduler.set_timesteps(STEPS)
    assert int(scheduler.timesteps[0]) == 999


def test_the_schedule_is_part_of_the_cache_key_only_when_it_is_not_sd15s(tiny, clip):
    config = InversionConfig(steps=STEPS)
    plain = cache_request(clip, tiny, config)
    assert "scheduler" not in plain and plain["model"] == tiny.fingerprint
    keys = set()
    for schedule in SCHEDULES.values():
        request = cache_request(clip, replace(tiny, scheduler_config=ddim_config(schedule)), config)
        keys.add(repr(request.get("scheduler")))
    assert len(keys) == len(SCHEDULES)
    assert key_of(ddim_config({**SD15_SCHEDULER, "skip_prk_steps": True, "trained_betas": None})) is None


def test_schedules_ddim_cannot_invert_are_refused_in_one_sentence():
    with pytest.raises(UserError) as error:
        ddim_config({**SD15_SCHEDULER, "timestep_spacing": "karras"})
    assert "cannot be inverted with DDIM" in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(UserError, match="prediction type 'flow'"):
        ddim_config({**SD15_SCHEDULER, "prediction_type": "flow"})


def test_a_prediction_type_override_and_zero_snr_need_trailing():
    assert ddim_config(SCHEDULES["epsilon"], "v_prediction")["prediction_type"] == "v_prediction"
    zero_snr = ddim_config({**SD15_SCHEDULER, "rescale_betas_zero_snr": True})
    assert zero_snr["timestep_spacing"] == "trailing"
    assert ddim_config({**SD15_SCHEDULER, "timestep_spacing": "linspace"})["timestep_spacing"] == "leading"
    assert "skip_prk_steps" not in ddim_config({**SD15_SCHEDULER, "skip_prk_steps": True})  # PNDM's own keys dropped
