"""LoRAs: read a user's LoRA file into a model (fused at its scale), and add a trainable one for `train`.

A LoRA given with `--lora FILE[:SCALE]` becomes part of the model: diffusers' own loader reads it into the
UNet (and the text encoder when the file has text-encoder weights) -- diffusers/peft files as they are,
kohya/Civitai files (`lora_unet_...`, `lora_te_...`) converted by diffusers -- then the adapter is fused
into the base weights at SCALE (W <- W + SCALE * alpha/r * B A) and the adapter modules are removed. The
step loop thus runs plain `nn.Linear`/`nn.Conv2d` layers, at the speed and memory of the model without
the LoRA, and the temporal attention processors see the same modules as always.

A LoRA is named in the model's identity (`Components.identity`, the cache key) by the sha256 of its
file's bytes and its scale: another file or scale is another cache entry; a renamed copy is the same.

Only `.safetensors` files are read (a pickled `.bin`/`.pt` could run code). A folder stands for the
`pytorch_lora_weights.safetensors` inside it (what `diffferv train --lora-rank` writes).
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Sequence
from pathlib import Path

from diffferv_cli.errors import UserError

LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' name, used by save_lora_weights
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # attention projections (diffusers' LoRA training example)
MAX_HEADER_BYTES = 100 << 20


def parse_lora(text: str) -> tuple[Path, float]:
    """`FILE[:SCALE]` -> (path, scale); SCALE defaults to 1.0. A colon whose tail is not a number belongs
    to the path (C:\\loras\\x.safetensors)."""
    path, scale = text, 1.0
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            scale = float(tail)
        except ValueError:
            pass
        else:
            path = head
            if not math.isfinite(scale):
                raise UserError(f"--lora {text}: the scale must be a finite number, not {tail!r}.")
    return Path(path).expanduser(), scale


def lora_file(path: Path) -> Path:
    """The LoRA file `path` names (a folder: its pytorch_lora_weights.safetensors), checked to be a
    safetensors file whose tensors all have LoRA names, from its header alone (no tensor is read).
    Raises `UserError` with one sentence otherwise."""
    path = Path(path)
    if path.is_dir():
        if not (path / LORA_FILE).is_file():
            raise UserError(f"LoRA folder {path} has no {LORA_FILE}; pass the LoRA's .safetensors file.")
        path = path / LORA_FILE
    if not path.is_file():
        raise UserError(f"LoRA file {path} does not exist.")
    names = _tensor_names(path)
    if not names:
        raise UserError(f"{path} is not a LoRA: it holds no tensors.")
    if not all("lora" in name for name in names):
        plain = next(name for name in names if "lora" not in name)
        raise UserError(f"{path} is not a LoRA: its tensor {plain!r} has no LoRA name (lora_A/lora_B, "
                        "lora_down/lora_up); a full checkpoint goes to --model.")
    return path


def _tensor_names(path: Path) -> list[str]:
    """The tensor names in a safetensors header (8-byte little-endian length, then JSON)."""
    not_safetensors = UserError(f"{path} is not a LoRA: it is not a .safetensors file (only those are read).")
    try:
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) != 8:
                raise not_safetensors
            (length,) = struct.unpack("<Q", prefix)
            if not 2 <= length <= MAX_HEADER_BYTES:
                raise not_safetensors
            header = json.loads(handle.read(length))
    except (ValueError, UnicodeDecodeError):
        raise not_safetensors from None
    except OSError as err:
        raise UserError(f"LoRA file {path} cannot be read ({err.strerror or err}).") from None
    if not isinstance(header, dict):
        raise not_safetensors
    return [name for name in header if name != "__metadata__"]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def apply_loras(comps, loras: Sequence[tuple[Path, float]]):
    """Fuse each (file, scale) into `comps` (in place, in order) and record it in `comps.loras`, which
    `Components.identity` puts in cache keys. Raises `UserError` for a file that is not a LoRA or does
    not fit the model."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    checked = [(lora_file(path), float(scale)) for path, scale in loras]  # all files, before any work
    if not checked:
        return comps
    holder = StableDiffusionPipeline(vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer,
                                     unet=comps.unet, scheduler=DDIMScheduler.from_config(comps.scheduler_config),
                                     safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    applied = list(comps.loras)
    for path, scale in checked:
        try:
            holder.load_lora_weights(str(path), adapter_name="diffferv", use_safetensors=True, local_files_only=True)
            holder.fuse_lora(lora_scale=scale, adapter_names=["diffferv"], safe_fusing=True)
        except (ValueError, RuntimeError, KeyError, TypeError, OSError) as err:
            holder.unload_lora_weights()
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise UserError(f"LoRA {path} does not fit the model {comps.model_id} ({reason}).") from None
        holder.unload_lora_weights()  # the adapter modules go, the fused weights stay
        applied.append((file_sha256(path), scale))
    for module in (comps.unet, comps.text_encoder):
        module.eval().requires_grad_(False)
    comps.loras = tuple(applied)
    return comps


# ------------------------------------------------------------------------------------------- training


def add_trainable_lora(unet, rank: int, seed: int = 0) -> list:
    """Give `unet` a LoRA of rank `rank` (alpha = rank) on its attention projections, as diffusers'
    train_text_to_image_lora example does (A Gaussian, drawn from `seed`; B zero, so training starts at
    the model itself); only the LoRA's parameters require grad. Returns them."""
    import torch
    from peft import LoraConfig

    unet.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                    target_modules=list(LORA_TARGETS)))
    return [parameter for parameter in unet.parameters() if parameter.requires_grad]


def lora_weights(unet) -> dict:
    """The LoRA of `unet` (`add_trainable_lora`) in diffusers' file layout, keys without the `unet.` prefix."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


def save_lora(unet, folder: Path) -> Path:
    """Write the LoRA of `unet` as `folder/pytorch_lora_weights.safetensors`, which `--lora` reads."""
    from diffusers import StableDiffusionPipeline

    weights = {name: tensor.detach().to("cpu").contiguous() for name, tensor in lora_weights(unet).items()}
    StableDiffusionPipeline.save_lora_weights(str(folder), unet_lora_layers=weights, weight_name=LORA_FILE,
                                              safe_serialization=True)
    return Path(folder) / LORA_FILE
