"""Resumable training checkpoints in safetensors and JSON only: loading one never unpickles anything.

A checkpoint is a folder `OUT/checkpoints/step-NNNNNNN/`:

    train_state.json           format, base model, the settings a resume must share, the step
    unet.safetensors           the trained UNet's weights (LoRA mode: only the LoRA's; the rest is --model's)
    optimizer.safetensors      the optimizer's tensors (Adam's moments and step counts) ...
    optimizer.json             ... and the rest of its state dict (param groups, hyper-parameters)
    lr_scheduler.json          the LR scheduler's state dict
    ema.safetensors, ema.json  the EMA's shadow weights and counters (--ema)
    grad_scaler.json           the fp16 loss scaler's state (--mixed-precision fp16)

A state dict is split into its tensors (safetensors) and a JSON skeleton in which every container is
tagged with its type (`{"dict": [[key, value], ...]}`, `{"list": [...]}`, `{"tuple": [...]}`) and every
tensor is a reference (`{"tensor": "t12"}`), so integer keys and tuples come back as they were, and a
tampered file can at worst give wrong numbers, never run code. Files of the older pickle-based layout
(`custom_checkpoint_0.pkl`, `optimizer.bin`, `random_states_0.pkl`, ...) are never read.

No random-number state is saved: every random draw of the training loop comes from generators seeded by
(seed, micro-batch, process), so the step number and the sample position decide them.

A checkpoint is written into a temporary folder beside it and renamed, so a folder named `step-N` is
always complete.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from diffferv_cli.errors import UserError
from diffferv_cli.files import atomic_write_json, fsync_tree, read_small_file

STATE_FILE = "train_state.json"
CHECKPOINTS = "checkpoints"
STATE_FORMAT = 2  # 2: safetensors + JSON (1: accelerate's pickles, refused)
# Settings a resumed run must share with its checkpoint (they decide which sample is which).
RESUME_KEYS = ("batch_size", "grad_accum", "prior_ratio", "seed", "resolution", "num_processes")
MAX_JSON_BYTES = 64 << 20


class SavedState(BaseModel):
    """train_state.json, type-checked before anything in the folder is used."""

    model_config = ConfigDict(extra="allow", strict=True)

    format: int
    base_model: str
    fingerprint: str
    step: int = Field(ge=0)
    batch_size: int
    grad_accum: int
    prior_ratio: float | int
    seed: int
    resolution: int
    num_processes: int


# ------------------------------------------------------------------------- state dicts as tensors + JSON


def split_state(state: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """(JSON skeleton, tensors) of a nested state dict; `join_state` inverts it."""
    tensors: dict[str, torch.Tensor] = {}

    def encode(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            name = f"t{len(tensors)}"
            tensors[name] = value.detach().cpu().contiguous()
            return {"tensor": name}
        if isinstance(value, dict):
            return {"dict": [[encode(key), encode(item)] for key, item in value.items()]}
        if isinstance(value, list):
            return {"list": [encode(item) for item in value]}
        if isinstance(value, tuple):
            return {"tuple": [encode(item) for item in value]}
        if isinstance(value, float) and not math.isfinite(value):
            return {"float": repr(value)}
        if value is None or isinstance(value, bool | int | float | str):
            return value
        raise TypeError(f"cannot store a {type(value).__name__} in a checkpoint")

    return encode(state), tensors


def join_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The state dict `split_state` took apart. Raises ValueError on anything it would not have written."""

    def decode(value: Any) -> Any:
        if value is None or isinstance(value, bool | int | float | str):
            return value
        if not isinstance(value, dict) or len(value) != 1:
            raise ValueError(f"unexpected {type(value).__name__} in a state skeleton")
        (kind, content), = value.items()
        if kind == "tensor" and isinstance(content, str) and content in tensors:
            return tensors[content]
        if kind == "float" and content in ("nan", "inf", "-inf"):
            return float(content)
        if kind in ("list", "tuple") and isinstance(content, list):
            items = [decode(item) for item in content]
            return items if kind == "list" else tuple(items)
        if kind == "dict" and isinstance(content, list) and all(isinstance(p, list) and len(p) == 2 for p in content):
            return {_hashable(decode(key)): decode(item) for key, item in content}
        raise ValueError(f"unexpected entry {kind!r} in a state skeleton")

    return decode(skeleton)


def _hashable(key: Any) -> Any:
    if isinstance(key, list | dict | torch.Tensor):
        raise ValueError("a state dict key must be a number, a string or a tuple")
    return key


def _save_state(folder: Path, name: str, state: Any) -> None:
    skeleton, tensors = split_state(state)
    if tensors:
        save_file(tensors, folder / f"{name}.safetensors")
    atomic_write_json(folder / f"{name}.json", skeleton)


def _load_state(folder: Path, name: str) -> Any:
    skeleton = json.loads(read_small_file(folder / f"{name}.json", MAX_JSON_BYTES, "checkpoint file"))
    tensor_file = folder / f"{name}.safetensors"
    tensors = load_file(tensor_file) if tensor_file.is_file() else {}
    return join_state(skeleton, tensors)


# ------------------------------------------------------------------------------------ save and load


def run_state(cfg, components, num_processes: int) -> dict:
    state = {"format": STATE_FORMAT, "base_model": components.model_id, "fingerprint": components.fingerprint,
             "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "prior_ratio": cfg.prior_ratio,
             "seed": cfg.seed, "resolution": cfg.resolution, "num_processes": num_processes, "step": 0}
    if cfg.lora_rank:  # only when set: full fine-tuning's state stays as it was
        state["lora_rank"] = cfg.lora_rank
    return state


def _trained_weights(unet, state: dict) -> dict[str, torch.Tensor]:
    """What a checkpoint stores of the UNet: all of it, or in LoRA mode only the LoRA (peft's lora_A/B)."""
    weights = unet.state_dict()
    if state.get("lora_rank"):
        weights = {name: tensor for name, tensor in weights.items() if ".lora_" in name}
    return weights


def save_checkpoint(accelerator, unet, optimizer, lr_scheduler, ema, out: Path, step: int, state: dict,
                    keep: int) -> Path:
    """Write step `step` (main process; the others wait) and keep the newest `keep` checkpoints."""
    final = out / CHECKPOINTS / f"step-{step:07d}"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        partial = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
        try:
            save_file({name: tensor.detach().cpu().contiguous()
                       for name, tensor in _trained_weights(accelerator.unwrap_model(unet), state).items()},
                      partial / "unet.safetensors")
            _save_state(partial, "optimizer", optimizer.state_dict())
            _save_state(partial, "lr_scheduler", lr_scheduler.state_dict())
            if ema is not None:
                _save_state(partial, "ema", ema.state_dict())
            if accelerator.scaler is not None:
                _save_state(partial, "grad_scaler", accelerator.scaler.state_dict())
            atomic_write_json(partial / STATE_FILE, {**state, "step": step})
            fsync_tree(partial)
            if final.exists():
                shutil.rmtree(final)
            partial.rename(final)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        if keep:
            for old in checkpoints(out)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def read_saved_state(folder: Path) -> SavedState:
    try:
        return SavedState.model_validate(json.loads(read_small_file(folder / STATE_FILE, 1 << 20, "checkpoint state")))
    except (ValueError, ValidationError) as err:
        detail = err.errors()[0] if isinstance(err, ValidationError) else None
        reason = f"{'.'.join(map(str, detail['loc']))}: {detail['msg']}" if detail else type(err).__name__
        raise UserError(f"Checkpoint {folder} has an unreadable {STATE_FILE} ({reason}).") from None


def load_checkpoint(accelerator, unet, optimizer, lr_scheduler, ema, folder: Path, state: dict) -> int:
    """Restore a checkpoint into the prepared objects; returns its step. UserError when it does not fit."""
    saved = read_saved_state(folder)
    if saved.format != STATE_FORMAT:
        raise UserError(f"Checkpoint {folder} is in an older format ({saved.format}, pickled state) that this "
                        "version does not load; start a new --out.")
    if saved.fingerprint != state["fingerprint"]:
        raise UserError(f"Checkpoint {folder} was trained from model {saved.base_model!r}, not "
                        f"{state['base_model']!r}; pass the same --model or start a new --out.")
    saved_rank = (saved.model_extra or {}).get("lora_rank")
    if saved_rank != state.get("lora_rank"):
        was = f"a LoRA of rank {saved_rank}" if saved_rank else "the whole UNet"
        now = f"--lora-rank {saved_rank}" if saved_rank else "no --lora-rank"
        raise UserError(f"Checkpoint {folder} trained {was}; resume with {now}.")
    named = re.fullmatch(r"step-(\d+)", folder.name)
    if named and int(named.group(1)) != saved.step:
        raise UserError(f"Checkpoint {folder} says step {saved.step} in its {STATE_FILE}, not {int(named.group(1))}; "
                        "the file was changed: resume from another checkpoint or start a new --out.")
    changed = [key for key in RESUME_KEYS if getattr(saved, key) != state[key]]
    if changed:
        detail = ", ".join(f"{key} {getattr(saved, key)} -> {state[key]}" for key in changed)
        raise UserError(f"Checkpoint {folder} was made with other settings ({detail}); resume with the same ones.")
    if (ema is not None) != (folder / "ema.json").is_file():
        have = "has no EMA" if ema is not None else "has an EMA"
        raise UserError(f"Checkpoint {folder} {have}; resume with the same --ema setting.")
    try:
        weights = load_file(folder / "unet.safetensors")
        model = accelerator.unwrap_model(unet)
        if state.get("lora_rank") and set(weights) != set(_trained_weights(model, state)):
            raise ValueError("its LoRA weights are not those of this run's LoRA")
        model.load_state_dict(weights, strict=not state.get("lora_rank"))
        optimizer_state = _load_state(folder, "optimizer")
        counts = {int(value["step"]) for value in optimizer_state.get("state", {}).values()
                  if isinstance(value, dict) and "step" in value}
        # the optimizer counts its steps; fp16's scaler may skip some, never add any
        if counts and (max(counts) > saved.step or (accelerator.scaler is None and counts != {saved.step})):
            raise UserError(f"Checkpoint {folder} says step {saved.step} in its {STATE_FILE} but its optimizer "
                            f"took {max(counts)} steps; resume from another checkpoint or start a new --out.")
        optimizer.load_state_dict(optimizer_state)
        lr_scheduler.load_state_dict(_load_state(folder, "lr_scheduler"))
        if ema is not None:
            ema.load_state_dict(_load_state(folder, "ema"))
        if accelerator.scaler is not None and (folder / "grad_scaler.json").is_file():
            accelerator.scaler.load_state_dict(_load_state(folder, "grad_scaler"))
    except (OSError, SafetensorError, RuntimeError, KeyError, ValueError, TypeError, IndexError) as err:
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        raise UserError(f"Checkpoint {folder} cannot be loaded ({reason}).") from None
    return saved.step


def checkpoints(out: Path) -> list[Path]:
    """Finished checkpoints, oldest first."""
    folder = out / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob("step-*") if p.is_dir() and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def resume_folder(out: Path, resume: str | None) -> Path | None:
    if resume is None:
        return None
    if resume == "latest":
        found = checkpoints(out)
        if not found:
            raise UserError(f"--resume latest: no checkpoint in {out / CHECKPOINTS}.")
        return found[-1]
    folder = Path(resume)
    if not (folder / STATE_FILE).is_file():
        raise UserError(f"--resume {folder}: not a checkpoint folder (no {STATE_FILE}).")
    return folder
