"""What a model is: its family (which pipeline class, which text encoders) and its noise schedule.

Every model is inverted, edited and trained with its own scheduler config (betas, `prediction_type`,
`timestep_spacing`, `rescale_betas_zero_snr`, ...), read from the model and normalised here to the
arguments of diffusers' `DDIMScheduler`, from which both DDIM and its inverse are built. Nothing else in
the project assumes SD 1.5's schedule.
"""

from __future__ import annotations

import inspect

from diffferv_cli.errors import UserError

# SD 1.x's noise schedule: the default of a model that ships no scheduler config, and tiny-random's.
SD15_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# What diffusers' DDIMInverseScheduler can step through (its `set_timesteps` knows these two).
TIMESTEP_SPACINGS = ("leading", "trailing")

# The pipelines whose UNet, VAE and CLIP text encoders diffferv drives, by `model_index.json` class name.
SD_PIPELINES = {"StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionXLPipeline",
                "StableDiffusionXLImg2ImgPipeline"}
SUPPORTED = "Stable Diffusion 1.x, 2.x and SDXL (UNet latent diffusion with CLIP text encoders)"


def ddim_config(config: dict, prediction_type: str | None = None) -> dict:
    """The model's scheduler config (of any scheduler class) as `DDIMScheduler` arguments, with
    `prediction_type` overridden when given; UserError for what DDIM inversion cannot do."""
    from diffusers import DDIMScheduler

    accepted = set(inspect.signature(DDIMScheduler.__init__).parameters) - {"self"}
    result = {key: value for key, value in config.items() if key in accepted}
    if prediction_type is not None:
        result["prediction_type"] = prediction_type
    prediction = result.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise UserError(f"The model's prediction type {prediction!r} is not supported; "
                        f"DDIM works with {', '.join(PREDICTION_TYPES)} (--prediction-type overrides it).")
    spacing = result.get("timestep_spacing", "leading")
    if spacing not in TIMESTEP_SPACINGS:
        if spacing == "linspace":  # DDIM's forward steps know it, its inverse does not: the nearest that both know
            result["timestep_spacing"] = "trailing" if result.get("rescale_betas_zero_snr") else "leading"
        else:
            raise UserError(f"The model's timestep spacing {spacing!r} cannot be inverted with DDIM; "
                            f"supported: {', '.join(TIMESTEP_SPACINGS)}.")
    if result.get("rescale_betas_zero_snr") and result.get("timestep_spacing", "leading") != "trailing":
        # zero terminal SNR needs its last step at t = T - 1 (Lin et al. 2023, section 3.3)
        result["timestep_spacing"] = "trailing"
    return result


def key_of(scheduler: dict) -> dict | None:
    """The scheduler's part of a cache key: None for SD 1.x's schedule (so that keys made before the
    scheduler was part of them stay valid), else the whole normalised config."""
    defaults = {"prediction_type": "epsilon", "timestep_spacing": "leading", "rescale_betas_zero_snr": False,
                "trained_betas": None, "clip_sample_range": 1.0, "thresholding": False,
                "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0}
    plain = {key: value for key, value in scheduler.items() if defaults.get(key, object()) != value}
    return None if plain == SD15_SCHEDULER else dict(sorted(scheduler.items()))


def check_pipeline_class(name: str | None, where: str) -> None:
    """UserError, naming what is supported, for a model_index.json class diffferv cannot drive."""
    if name is None or name in SD_PIPELINES:
        return
    raise UserError(f"{where} is a {name}; diffferv edits with {SUPPORTED}.")
