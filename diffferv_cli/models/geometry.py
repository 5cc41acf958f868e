"""The working-size rules of a model, read from its configs alone (no weights, no torch): what the working
sides must be multiples of, and the short side the model was trained at."""

from __future__ import annotations

import json
from pathlib import Path

from diffferv_cli.errors import UserError

# what the working sides of the random tiny models must be multiples of: VAE /8 times 2 per UNet down
# block after the first (models/tiny.py)
TINY_MULTIPLES = {"tiny-random": 16, "tiny-random-sdxl": 32}

TINY_SIZE = 512  # a random model has no native size: SD 1.x's


def model_geometry(model: str) -> tuple[int, int]:
    """(what the working sides must be multiples of, the native short side) of `model`, from its configs
    alone (no weights): the VAE's factor times 2 per UNet down block after the first, and the UNet's sample
    size times the VAE's factor (512 for SD 1.x, 768 for SD 2.x 768-v, 1024 for SDXL). A hub model not in
    the cache is taken for SD 1.x (64, 512) until it is downloaded."""
    if model in TINY_MULTIPLES:
        return TINY_MULTIPLES[model], TINY_SIZE
    unet, vae = _configs_of(model)
    if not unet or not vae:
        return 64, 512
    factor = 2 ** (len(vae.get("block_out_channels", (1, 2, 3, 4))) - 1)
    multiple = factor * 2 ** (len(unet.get("block_out_channels", (1, 2, 3, 4))) - 1)
    return max(multiple, 8), int(unet.get("sample_size", 64)) * factor  # a power of two: 8 covers smaller needs


def _configs_of(model: str) -> tuple[dict, dict]:
    path = Path(model).expanduser()
    try:
        if path.suffix in (".safetensors", ".ckpt") and path.is_file():
            from diffferv_cli.models.single_file import detect_family, prediction_of, read_shapes
            from diffferv_cli.models.skeletons import skeleton

            shapes, _ = read_shapes(path)
            family = detect_family(shapes, f"The checkpoint {path}")
            files = skeleton(shapes, family, prediction_of(family, shapes, path, None))
            return files["unet/config.json"], files["vae/config.json"]
        if path.is_dir():
            return (json.loads((path / "unet" / "config.json").read_text()),
                    json.loads((path / "vae" / "config.json").read_text()))
        from huggingface_hub import try_to_load_from_cache

        found = [try_to_load_from_cache(model, f"{part}/config.json") for part in ("unet", "vae")]
        return tuple(json.loads(Path(item).read_text()) if isinstance(item, str) else {} for item in found)
    except (OSError, ValueError, UserError):
        return {}, {}


def is_sdxl(model: str) -> bool:
    """Whether `model`'s UNet takes SDXL's added conditioning, from its config (False when unknown)."""
    if model in TINY_MULTIPLES:
        return model == "tiny-random-sdxl"
    unet, _ = _configs_of(model)
    return unet.get("addition_embed_type") == "text_time"
