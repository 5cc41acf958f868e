"""Specialization stage (paper sections 3.2 and 4.1): fine-tune the UNet on captioned faces.

The loss is the latent diffusion loss (eq. 4), E ||eps - eps_theta(z_t, t, c)||^2 (or the velocity
target for v-prediction models), on face image-caption pairs mixed with a share of general image-text
pairs that keep the original prior. VAE and text encoder stay frozen. Everything device-related goes
through accelerate, so the same code runs on a CPU, one GPU or many (`accelerate launch diffferv train
...`, torchrun, multi-node), with mixed precision, gradient accumulation and gradient checkpointing.

Determinism and resume: which image the n-th sample shows, and its augmentation, are pure functions of n
(`data.SamplePlan`); the noise, timesteps and VAE sample of micro-batch m on process p come from a
generator seeded with (seed, m, p). A checkpoint (`OUT/checkpoints/step-NNNNNNN/`, see `checkpoint.py`:
UNet, optimizer, LR scheduler and EMA in safetensors + JSON, never a pickle) therefore holds all that a
resumed run needs to give the same weights as an uninterrupted one.

A run is `_setup` (data, optimizer, schedule, accelerate, resume), then per micro-batch `_micro_step`
(loss, backward, optimizer step when accumulation completes), after each optimizer step `_after_step`
(divergence check, EMA, progress, checkpoint, validation), and `_finish` (export).

LoRA mode (`lora_rank`): the UNet stays frozen (in the mixed-precision dtype, as diffusers' LoRA example
keeps it) and a LoRA of that rank on its attention projections (models/lora.py) is trained in float32
instead; checkpoints hold only the LoRA, and the export is the LoRA file, used with `--lora OUT` on the
same base model. Resume, validation, gradient checkpointing, mixed precision, 8-bit Adam and several
processes work as in full fine-tuning; EMA does not (an average of the factors A and B is not an
average of the LoRA B A), so it is refused.

Output folder (`--out`):
    model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/   a diffusers model: --model OUT
    pytorch_lora_weights.safetensors   instead, in LoRA mode: --model BASE --lora OUT
    train_info.json        base model, settings, steps, last loss, unreadable images skipped
    checkpoints/step-NNNNNNN/   resumable state (the newest `keep_checkpoints` are kept)
    validation/step-NNNNNNN/    sample images of the validation prompts
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from diffferv_cli.config import TrainConfig
from diffferv_cli.errors import UserError
from diffferv_cli.files import atomic_path, atomic_write_json, atomic_write_text
from diffferv_cli.training.checkpoint import (
    CHECKPOINTS,
    load_checkpoint,
    resume_folder,
    run_state,
    save_checkpoint,
)
from diffferv_cli.training.data import ImageSet, TrainSamples, collate, scan_images


class TrainingInterrupted(UserError):
    """Ctrl-C during training: the last finished step was saved as a checkpoint."""

    exit_code = 130


@dataclass
class TrainProgress:
    step: int
    total: int
    loss: float
    lr: float
    samples: int  # samples seen so far, all processes
    skipped: int  # distinct unreadable images so far


@dataclass
class TrainResult:
    out: Path
    steps: int
    losses: list[float] = field(default_factory=list)  # mean loss of each optimizer step of this run
    skipped: list[str] = field(default_factory=list)
    checkpoints: list[Path] = field(default_factory=list)
    resumed_from: int = 0


ProgressFn = Callable[[TrainProgress], None]


def prepare_data(cfg: TrainConfig) -> tuple[ImageSet, ImageSet | None]:
    faces = scan_images(cfg.faces, cfg.captions, option="--captions")
    prior = scan_images(cfg.prior, cfg.prior_captions, option="--prior-captions") if cfg.prior else None
    return faces, prior


SDXL_TRAINING = ("train fine-tunes Stable Diffusion 1.x and 2.x models; SDXL is not supported (its second text "
                 "encoder and size conditioning are not trained here): fine-tune SDXL elsewhere and edit with it.")


def train(components, cfg: TrainConfig, *, cpu: bool = False, progress: ProgressFn | None = None,
          on_step: Callable[[int], None] | None = None) -> TrainResult:
    """Fine-tune `components.unet` per `cfg` and write a diffusers model folder to `cfg.out`.

    `components` is a float32 Components as loaded by `models.loading.load_components` (or built for tests);
    its UNet is trained in place. `on_step(step)` runs after each optimizer step (tests use it to
    interrupt a run)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    if getattr(components, "is_sdxl", False):
        raise UserError(SDXL_TRAINING)
    if cfg.lora_rank and cfg.ema:
        raise UserError("--ema cannot be used with --lora-rank: an average of the LoRA's two factors is not "
                        "an average of the LoRA, so train it without --ema.")
    faces, prior = prepare_data(cfg)
    resume_dir = resume_folder(Path(cfg.out), cfg.resume)

    try:
        accelerator = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
                                  cpu=cpu, project_config=ProjectConfiguration(project_dir=str(cfg.out)))
    except ValueError as err:
        raise UserError(f"Cannot train with --mixed-precision {cfg.mixed_precision} here ({err}).") from None
    try:
        run = _setup(accelerator, components, cfg, faces, prior, resume_dir)
        return _train(run, progress, on_step)
    finally:  # accelerate keeps process-wide state; a later run in this process starts clean
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


@dataclass
class _Run:
    """What one training run holds from setup to export (built by `_setup`)."""

    accelerator: Any
    components: Any
    cfg: TrainConfig
    unet: Any  # prepared by accelerate (maybe wrapped for DDP)
    optimizer: Any
    lr_scheduler: Any
    loader: Any
    ema: Any  # diffusers EMAModel or None
    noise_scheduler: Any
    weight_dtype: torch.dtype
    state: dict  # what checkpoints record about the run (checkpoint.run_state)
    start_step: int
    samples_per_step: int

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)


def _train(run: _Run, progress: ProgressFn | None, on_step) -> TrainResult:
    """The loop: micro-batches (`_micro_step`) until `cfg.steps` optimizer steps, the bookkeeping after
    each (`_after_step`), a checkpoint on Ctrl-C, then the export (`_finish`)."""
    accelerator, cfg = run.accelerator, run.cfg
    result = TrainResult(out=run.out, steps=run.start_step, resumed_from=run.start_step)
    skipped: set[str] = set()
    step, micro = run.start_step, run.start_step * cfg.grad_accum
    micro_losses: list[float] = []
    saved_at = run.start_step
    try:
        for batch in run.loader:  # cfg.steps optimizer steps' worth of micro-batches (less those resumed past)
            skipped.update(batch["skipped"])
            micro_losses.append(_micro_step(run, batch, micro))
            micro += 1
            if not accelerator.sync_gradients:
                continue
            step += 1  # one optimizer step done
            result.steps = step
            result.losses.append(sum(micro_losses) / len(micro_losses))
            micro_losses = []
            if _after_step(run, step, result, len(skipped), progress):
                saved_at = step
            if on_step is not None:
                on_step(step)
    except KeyboardInterrupt:
        if step > saved_at:
            _checkpoint(run, step)
        raise TrainingInterrupted(
            f"Interrupted after step {step} of {cfg.steps}; its checkpoint is in {run.out / CHECKPOINTS}, "
            "continue with the same command and --resume latest.") from None
    result.skipped = sorted(skipped)
    _finish(run, result)
    return result


def _setup(accelerator, components, cfg: TrainConfig, faces: ImageSet, prior: ImageSet | None,
           resume_dir: Path | None) -> _Run:
    """Check the output folder, freeze VAE and text encoder, build optimizer, LR schedule, data loader
    and EMA, hand them to accelerate, and restore a checkpoint when resuming."""
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler

    out = Path(cfg.out)
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise UserError("--mixed-precision fp16 needs a GPU; on the CPU use bf16 or no.")
    if accelerator.is_main_process:  # the other processes would see the folder the main one just made
        _check_out_folder(out, resuming=resume_dir is not None)
    accelerator.wait_for_everyone()
    device = accelerator.device
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

    unet = components.unet
    components.vae.requires_grad_(False).eval().to(device, dtype=weight_dtype)
    components.text_encoder.requires_grad_(False).eval().to(device, dtype=weight_dtype)
    if cfg.lora_rank:  # the frozen base in the compute dtype, the LoRA in float32
        from diffferv_cli.models.lora import add_trainable_lora

        trained = add_trainable_lora(unet, cfg.lora_rank, seed=cfg.seed)  # drawn before any device move
        unet.to(device, dtype=weight_dtype)
        for parameter in trained:
            parameter.data = parameter.data.float()
    else:
        unet.requires_grad_(True)
        trained = list(unet.parameters())
    unet.train()
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()

    optimizer = _optimizer(cfg, trained)
    lr_scheduler = get_scheduler("constant_with_warmup", optimizer,
                                 num_warmup_steps=cfg.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=cfg.steps * accelerator.num_processes)
    samples_per_step = cfg.batch_size * cfg.grad_accum * accelerator.num_processes
    dataset = TrainSamples(faces, prior, length=cfg.steps * samples_per_step, resolution=cfg.resolution,
                           prior_ratio=cfg.prior_ratio, seed=cfg.seed, max_zoom=cfg.max_zoom,
                           max_rotation=cfg.max_rotation, center_crop=cfg.center_crop)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, shuffle=False, collate_fn=collate,
                                         num_workers=cfg.workers, persistent_workers=False,
                                         generator=torch.Generator().manual_seed(cfg.seed))
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
    ema = None
    if cfg.ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(accelerator.unwrap_model(unet).parameters(), decay=cfg.ema_decay)
        ema.to(device)

    state = run_state(cfg, components, accelerator.num_processes)
    start_step = 0
    if resume_dir is not None:
        start_step = load_checkpoint(accelerator, unet, optimizer, lr_scheduler, ema, resume_dir, state)
        accelerator.step = start_step * cfg.grad_accum  # accelerate's micro-batch count (accumulation phase)
        loader = accelerator.skip_first_batches(loader, start_step * cfg.grad_accum)
    return _Run(accelerator, components, cfg, unet, optimizer, lr_scheduler, loader, ema,
                DDPMScheduler.from_config(components.scheduler_config), weight_dtype, state, start_step,
                samples_per_step)


def _micro_step(run: _Run, batch: dict, micro: int) -> float:
    """Loss, backward and (when accumulation completes) the optimizer step of micro-batch `micro`; returns
    the loss averaged over processes."""
    accelerator, cfg, components = run.accelerator, run.cfg, run.components
    generator = _micro_generator(cfg.seed, micro, accelerator.process_index)
    with accelerator.accumulate(run.unet):
        loss = _diffusion_loss(batch, run.unet, components.vae, components.text_encoder, components.tokenizer,
                               run.noise_scheduler, float(getattr(components.vae.config, "scaling_factor", 0.18215)),
                               run.weight_dtype, accelerator.device, generator)
        accelerator.backward(loss)
        if accelerator.sync_gradients and cfg.max_grad_norm:
            accelerator.clip_grad_norm_(run.unet.parameters(), cfg.max_grad_norm)
        run.optimizer.step()
        run.lr_scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    return accelerator.gather(loss.detach()[None]).mean().item()


def _after_step(run: _Run, step: int, result: TrainResult, skipped: int, progress: ProgressFn | None) -> bool:
    """After optimizer step `step`: divergence check, EMA, progress, checkpoint, validation images.
    Returns whether a checkpoint was written."""
    accelerator, cfg = run.accelerator, run.cfg
    loss = result.losses[-1]
    if not math.isfinite(loss) and cfg.mixed_precision != "fp16":  # fp16's loss scaler skips such steps itself
        raise UserError(f"Training diverged at step {step} (loss {loss}); nothing was exported. Lower --lr "
                        f"(now {cfg.lr:g}) or keep --max-grad-norm.")
    if run.ema is not None:
        run.ema.step(accelerator.unwrap_model(run.unet).parameters())
    if progress is not None and accelerator.is_main_process:
        progress(TrainProgress(step, cfg.steps, loss, run.lr_scheduler.get_last_lr()[0],
                               step * run.samples_per_step, skipped))
    saved = False
    if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
        result.checkpoints.append(_checkpoint(run, step))
        saved = True
    if cfg.validate_every and cfg.validation_prompts and step % cfg.validate_every == 0:
        _validate(accelerator, run.components, run.unet, cfg, run.out / "validation" / f"step-{step:07d}", run.ema)
    return saved


def _checkpoint(run: _Run, step: int) -> Path:
    return save_checkpoint(run.accelerator, run.unet, run.optimizer, run.lr_scheduler, run.ema, run.out, step,
                           run.state, run.cfg.keep_checkpoints)


def _finish(run: _Run, result: TrainResult) -> None:
    """The trained (or EMA) weights as a diffusers folder, on the main process."""
    accelerator = run.accelerator
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        trained = accelerator.unwrap_model(run.unet)
        if run.ema is not None:
            run.ema.copy_to(trained.parameters())
        if not all(bool(torch.isfinite(p).all()) for p in trained.parameters() if p.requires_grad):
            raise UserError(f"Training diverged: the weights hold NaN or infinity after {result.steps} steps; "
                            f"nothing was exported. Lower --lr (now {run.cfg.lr:g}).")
        if run.cfg.lora_rank:
            _export_lora(run.components, trained, run.out, run.cfg, result)
        else:
            _export(run.components, trained, run.out, run.cfg, result)
    accelerator.end_training()


# ---------------------------------------------------------------------------------------- the loss


def _diffusion_loss(batch, unet, vae, text_encoder, tokenizer, noise_scheduler, scaling, weight_dtype, device,
                    generator) -> torch.Tensor:
    """Eq. 4 on one micro-batch. All random draws come from `generator` (CPU) for exact resume."""
    pixels = batch["pixels"].to(device, dtype=weight_dtype)
    with torch.no_grad():
        posterior = vae.encode(pixels).latent_dist
        latents = posterior.sample(generator=generator) * scaling  # (batch, 4, R/8, R/8)
        # not prompts.encode_prompts: its inference-mode tensors cannot enter a graph that is differentiated
        ids = tokenizer(batch["captions"], padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids.to(device)
        text = text_encoder(ids)[0]  # (batch, 77, hidden)
    latents = latents.float()
    noise = torch.randn(latents.shape, generator=generator).to(device)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                              generator=generator).to(device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    prediction = unet(noisy, timesteps, text).sample  # mixed precision: accelerate's autocast wraps the UNet
    return F.mse_loss(prediction.float(), target.float())


def _micro_generator(seed: int, micro: int, process: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, micro, process]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def _optimizer(cfg: TrainConfig, parameters):
    """Adam (paper section 4.1); bitsandbytes' 8-bit Adam when asked for."""
    if cfg.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserError("--8bit-adam needs the bitsandbytes package (pip install bitsandbytes).") from None
        return bnb.optim.Adam8bit(parameters, lr=cfg.lr)
    return torch.optim.Adam(parameters, lr=cfg.lr)


# ------------------------------------------------------------------------------- out folder, resume


def _check_out_folder(out: Path, resuming: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder.")
    if out.is_dir() and any(out.iterdir()) and not resuming:
        raise UserError(f"--out {out} is not empty; continue its run with --resume latest, or choose a new folder.")
    try:
        (out / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise UserError(f"Cannot write to --out {out} ({err.strerror or err}).") from None


def _export(components, trained_unet, out: Path, cfg: TrainConfig, result: TrainResult) -> None:
    """The trained model as a diffusers folder (loadable with --model OUT), plus train_info.json."""
    from dataclasses import replace

    from diffferv_cli.models.loading import save_components

    trained_unet = trained_unet.to("cpu", dtype=torch.float32).eval()
    exported = replace(components, unet=trained_unet, vae=components.vae.to("cpu", dtype=torch.float32),
                       text_encoder=components.text_encoder.to("cpu", dtype=torch.float32))
    save_components(exported, out)
    _write_info(components, out, cfg, result)


def _export_lora(components, trained_unet, out: Path, cfg: TrainConfig, result: TrainResult) -> None:
    """The trained LoRA as OUT/pytorch_lora_weights.safetensors (`--model BASE --lora OUT`), plus
    train_info.json."""
    from diffferv_cli.models.lora import save_lora

    path = save_lora(trained_unet, out)
    _write_info(components, out, cfg, result, lora=path.name)


def _write_info(components, out: Path, cfg: TrainConfig, result: TrainResult, **extra) -> None:
    last_loss = result.losses[-1] if result.losses else None
    info = {"base_model": components.model_id, "base_fingerprint": components.fingerprint, "steps": result.steps,
            "last_loss": last_loss if last_loss is not None and math.isfinite(last_loss) else None,
            "skipped_images": result.skipped, "settings": json.loads(cfg.model_dump_json()), **extra}
    atomic_write_json(out / "train_info.json", info)


def _validate(accelerator, components, unet, cfg: TrainConfig, folder: Path, ema) -> None:
    """Sample each validation prompt (seeded) into `folder` as PNG; main process only."""
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        return
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    model = accelerator.unwrap_model(unet)
    if ema is not None:
        ema.store(model.parameters())
        ema.copy_to(model.parameters())
    model.eval()
    pipe = StableDiffusionPipeline(vae=components.vae, text_encoder=components.text_encoder,
                                   tokenizer=components.tokenizer, unet=model,
                                   scheduler=DDIMScheduler.from_config(components.scheduler_config),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    folder.mkdir(parents=True, exist_ok=True)
    for index, prompt in enumerate(cfg.validation_prompts):
        generator = torch.Generator().manual_seed(cfg.seed + index)
        with torch.no_grad(), accelerator.autocast():
            image = pipe(prompt, height=cfg.resolution, width=cfg.resolution,
                         num_inference_steps=cfg.validation_steps, guidance_scale=cfg.validation_guidance,
                         generator=generator).images[0]
        with atomic_path(folder / f"{index:02d}.png") as temp:
            image.save(temp, format="PNG")
    atomic_write_text(folder / "prompts.txt", "\n".join(cfg.validation_prompts) + "\n")
    if ema is not None:
        ema.restore(model.parameters())
    model.train()
    accelerator.wait_for_everyone()

