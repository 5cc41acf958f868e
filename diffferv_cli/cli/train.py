"""`diffferv train` (specialization fine-tuning) and `diffferv caption` (sidecar captions)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from diffferv_cli.cli import ModelOpt, console, err_console
from diffferv_cli.config import DEFAULT_MODEL, TrainConfig, choices, default
from diffferv_cli.errors import UserError
from diffferv_cli.models.lora import LORA_FILE


def register(app: typer.Typer) -> None:
    app.command("train", epilog="Examples: diffferv train --faces faces/ --prior laion/ --out models/faces  |  diffferv train --faces faces/ --out models/lora --lora-rank 16 --lr 1e-4")(train_cmd)
    app.command("caption", epilog="Example: diffferv caption faces/ --model ./pixtral-12b")(caption_cmd)


# TrainConfig fields whose option is not the field name with dashes
_OPTION_OF = {"lr_warmup_steps": "--warmup", "use_8bit_adam": "--8bit-adam", "validation_prompts": "--validation-prompt"}


def _is_main_process() -> bool:
    return os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) == "0"


def train_cmd(
    faces: Annotated[Path, typer.Option("--faces", help="Face images: folder (sidecar .txt captions) or .tar shards.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder: the trained diffusers model, checkpoints, validation images.", show_default=False)],
    model: ModelOpt = DEFAULT_MODEL,
    prior: Annotated[Path | None, typer.Option("--prior", help="General image-text pairs that keep the original prior.")] = default(TrainConfig, "prior"),
    prior_ratio: Annotated[float, typer.Option("--prior-ratio", help="Share of samples drawn from --prior.")] = default(TrainConfig, "prior_ratio"),
    captions: Annotated[Path | None, typer.Option("--captions", help="JSONL/CSV manifest (file,text) for --faces instead of sidecar .txt.")] = default(TrainConfig, "captions"),
    prior_captions: Annotated[Path | None, typer.Option("--prior-captions", help="Same for --prior.")] = default(TrainConfig, "prior_captions"),
    steps: Annotated[int, typer.Option("--steps", help="Optimizer steps.")] = default(TrainConfig, "steps"),
    batch_size: Annotated[int, typer.Option("--batch-size", help="Samples per process per micro-batch.")] = default(TrainConfig, "batch_size"),
    grad_accum: Annotated[int, typer.Option("--grad-accum", help="Micro-batches per optimizer step.")] = default(TrainConfig, "grad_accum"),
    lr: Annotated[float, typer.Option("--lr", help="Adam learning rate.")] = default(TrainConfig, "lr"),
    warmup: Annotated[int, typer.Option("--warmup", help="Linear LR warm-up steps.")] = default(TrainConfig, "lr_warmup_steps"),
    resolution: Annotated[int, typer.Option("--resolution", help="Training image size (square crops).")] = default(TrainConfig, "resolution"),
    center_crop: Annotated[bool, typer.Option("--center-crop", help="Centre crops instead of random crops.")] = default(TrainConfig, "center_crop"),
    max_zoom: Annotated[float, typer.Option("--max-zoom", help="Face zoom-in drawn from [1, max].")] = default(TrainConfig, "max_zoom"),
    max_rotation: Annotated[float, typer.Option("--max-rotation", help="Face rotation drawn from +-max degrees.")] = default(TrainConfig, "max_rotation"),
    mixed_precision: Annotated[str, typer.Option("--mixed-precision", help="no, fp16 or bf16.")] = default(TrainConfig, "mixed_precision"),
    gradient_checkpointing: Annotated[bool, typer.Option("--gradient-checkpointing", help="Trade compute for memory.")] = default(TrainConfig, "gradient_checkpointing"),
    adam_8bit: Annotated[bool, typer.Option("--8bit-adam", help="bitsandbytes 8-bit Adam.")] = default(TrainConfig, "use_8bit_adam"),
    ema: Annotated[bool, typer.Option("--ema", help="Keep an EMA of the weights and export it.")] = default(TrainConfig, "ema"),
    lora_rank: Annotated[int | None, typer.Option("--lora-rank", metavar="R", help="Train a LoRA of rank R on the UNet's attention projections instead of the whole UNet, and export it as OUT/pytorch_lora_weights.safetensors for --lora (LoRAs usually want a larger --lr, e.g. 1e-4).", show_default=False)] = default(TrainConfig, "lora_rank"),
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", help="Checkpoint every N steps (0: never).")] = default(TrainConfig, "checkpoint_every"),
    keep_checkpoints: Annotated[int, typer.Option("--keep-checkpoints", help="Newest checkpoints kept (0: all).")] = default(TrainConfig, "keep_checkpoints"),
    resume: Annotated[str | None, typer.Option("--resume", help="'latest' or a checkpoint folder.")] = default(TrainConfig, "resume"),
    validate_every: Annotated[int, typer.Option("--validate-every", help="Sample the validation prompts every N steps.")] = default(TrainConfig, "validate_every"),
    validation_prompt: Annotated[list[str] | None, typer.Option("--validation-prompt", help="Repeat for several.")] = None,
    seed: Annotated[int, typer.Option("--seed")] = default(TrainConfig, "seed"),
    workers: Annotated[int, typer.Option("--workers", help="Data-loading processes.")] = default(TrainConfig, "workers"),
    cpu: Annotated[bool, typer.Option("--cpu", help="Train on the CPU even when a GPU is present.")] = False,
) -> None:
    """Fine-tune the UNet on captioned faces (paper section 3.2); the result loads with --model OUT."""
    from diffferv_cli.models.loading import load_components
    from diffferv_cli.training.loop import train

    if mixed_precision not in choices(TrainConfig, "mixed_precision"):
        raise UserError(f"--mixed-precision must be no, fp16 or bf16, not {mixed_precision!r}.")
    try:
        cfg = TrainConfig(
            faces=faces, out=out, prior=prior, prior_ratio=prior_ratio, captions=captions,
            prior_captions=prior_captions, steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
            lr_warmup_steps=warmup, resolution=resolution, center_crop=center_crop, max_zoom=max_zoom,
            max_rotation=max_rotation, mixed_precision=mixed_precision, gradient_checkpointing=gradient_checkpointing,
            use_8bit_adam=adam_8bit, ema=ema, lora_rank=lora_rank, checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints,
            resume=resume, validate_every=validate_every, validation_prompts=tuple(validation_prompt or ()),
            seed=seed, workers=workers)
    except ValueError as err:
        first = err.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "setting"
        option = _OPTION_OF.get(field, "--" + field.replace("_", "-"))
        raise UserError(f"Invalid training setting {option}: {first['msg']}.") from None
    from diffferv_cli.models.geometry import is_sdxl
    from diffferv_cli.training.loop import SDXL_TRAINING

    if is_sdxl(model):  # said before any weight loads
        raise UserError(SDXL_TRAINING)
    components = load_components(model, device="cpu", dtype="fp32")
    if components.is_random:
        err_console.print(f"[yellow]Model: {components.label}[/yellow]")

    columns = (TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
               TextColumn("{task.fields[rate]} step/s"), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err_console, disable=not _is_main_process()) as bars:
        task = bars.add_task("train", total=steps, loss="-", rate="-")
        started, first = time.perf_counter(), None

        def report(progress) -> None:
            nonlocal first
            first = progress.step - 1 if first is None else first
            elapsed = time.perf_counter() - started
            rate = (progress.step - first) / elapsed if elapsed > 0 else 0.0
            bars.update(task, completed=progress.step, loss=f"{progress.loss:.4f}", rate=f"{rate:.2f}")

        result = train(components, cfg, cpu=cpu, progress=report)
    if not _is_main_process():
        return
    if result.skipped:
        err_console.print(f"Skipped {len(result.skipped)} unreadable image(s): {', '.join(result.skipped[:5])}"
                          + (" ..." if len(result.skipped) > 5 else ""), markup=False)
    last = f", last loss {result.losses[-1]:.4f}" if result.losses else ""
    if lora_rank:
        console.print(f"Trained {result.steps} steps{last}. LoRA: {out / LORA_FILE} (use it with --model {model} "
                      f"--lora {out})", markup=False)
    else:
        console.print(f"Trained {result.steps} steps{last}. Model: {out} (use it with --model {out})", markup=False)


def caption_cmd(
    folder: Annotated[Path, typer.Argument(help="Folder of images; writes <image>.txt beside each.", show_default=False)],
    model: Annotated[str, typer.Option("--model", "-m", help="image-text-to-text model: hub id or local folder (e.g. mistral-community/pixtral-12b).", show_default=False)],
    instruction: Annotated[str | None, typer.Option("--instruction", help="What chat models are asked.")] = None,
    prefix: Annotated[str | None, typer.Option("--prefix", help="Text that plain captioners continue.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing .txt captions.")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per model call.")] = 4,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens")] = 60,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:1.")] = "auto",
) -> None:
    """Write a caption beside every image of FOLDER with a vision-language model."""
    from diffferv_cli.models.auxiliary import load_captioner
    from diffferv_cli.training.captioning import DEFAULT_INSTRUCTION, DEFAULT_PREFIX, caption_folder

    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder of images.")
    if batch_size < 1:
        raise UserError("--batch-size must be at least 1.")
    pipe = load_captioner(model, device)
    with Progress(TextColumn("caption"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=err_console) as bars:
        task = bars.add_task("caption", total=None)
        result = caption_folder(folder, pipe, overwrite=overwrite, batch_size=batch_size,
                                instruction=instruction or DEFAULT_INSTRUCTION, prefix=prefix or DEFAULT_PREFIX,
                                max_new_tokens=max_new_tokens,
                                progress=lambda done, total: bars.update(task, completed=done, total=total))
    if result.unreadable:
        err_console.print(f"Skipped {len(result.unreadable)} unreadable image(s): "
                          + ", ".join(p.name for p in result.unreadable[:5]), markup=False)
    console.print(f"Captions written: {len(result.written)}; kept (already captioned): {len(result.kept)}.")
