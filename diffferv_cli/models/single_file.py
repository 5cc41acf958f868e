"""One checkpoint file in the original Stable Diffusion layout (`.safetensors`; `.ckpt` read without
running pickled code), loaded offline.

1. The family is read from the file's tensor names and shapes, as diffusers reads it
   (`infer_diffusers_model_type`): SD 1.x, SD 2.x and SDXL base load; any other family is refused in one
   sentence before a weight is read.
2. The prediction type: `--prediction-type` when given; else a `v_pred` marker in the file (kohya's
   convention) means v-prediction; else diffusers' rule -- SD 1.x predicts noise, SD 2.x predicts v unless
   the file's `global_step` is 875000 (the 512 base model).
3. Configs and tokenizer: the family's diffusers repository when the local Hugging Face cache holds its
   configs, else the skeleton of models/skeletons.py (sizes read from the file). Nothing is fetched, and
   no safety checker is ever loaded.
4. The fingerprint is the file's content hash (SHA-256), remembered per (path, size, modification time,
   inode) in a small index beside the inversion cache: a renamed or touched copy is hashed once and then
   reuses its cache entries, an edited file gets new ones, and an unchanged file is never hashed twice.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from diffferv_cli.errors import UserError
from diffferv_cli.models.components import Components

FAMILY_NAMES = {"v1": "Stable Diffusion 1.x", "v2": "Stable Diffusion 2.x", "xl_base": "SDXL"}
# diffusers' names of the families it recognises that diffferv does not drive, for the refusal
OTHER_FAMILIES = {"xl_refiner": "an SDXL refiner", "xl_inpaint": "an SDXL inpainting model",
                  "inpainting": "an SD inpainting model", "inpainting_v2": "an SD 2 inpainting model",
                  "playground-v2-5": "Playground v2.5", "upscale": "an SD upscaler"}
CONFIG_REPOS = {"v1": "stable-diffusion-v1-5/stable-diffusion-v1-5", "v2": "stabilityai/stable-diffusion-2-1",
                "xl_base": "stabilityai/stable-diffusion-xl-base-1.0"}


class _Shape:
    """Stands for a tensor where only `.shape` is asked (diffusers' family detection)."""

    def __init__(self, shape):
        self.shape = torch.Size(shape)


def read_shapes(path: Path) -> tuple[dict[str, tuple], dict[str, str]]:
    """{tensor name: shape} and the metadata of a checkpoint, without reading its weights (safetensors'
    header; a `.ckpt` is memory-mapped with `weights_only`, which runs no pickled code)."""
    from diffferv_cli.models.loading import _not_available

    try:
        if path.suffix == ".ckpt":
            state = _ckpt_state(path)
            return {key: tuple(value.shape) for key, value in state.items() if hasattr(value, "shape")}, {}
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}, metadata
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - a file that is not a checkpoint, whatever the library says
        raise _not_available(str(path), f"it is not a readable checkpoint: {(str(err).splitlines() or [''])[0]}") from None


def _ckpt_state(path: Path) -> dict:
    from diffferv_cli.models.loading import _not_available

    try:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - refused pickles included
        raise _not_available(str(path), f"it cannot be read without running its pickled code "
                                        f"({type(err).__name__}); convert it to .safetensors") from None
    return loaded.get("state_dict", loaded) if isinstance(loaded, dict) else {}


def detect_family(shapes: dict[str, tuple], where: str) -> str:
    """'v1' or 'v2' (diffusers' names), or UserError naming what the file is and what is supported."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    family = infer_diffusers_model_type({key: _Shape(shape) for key, shape in shapes.items()})
    if family in FAMILY_NAMES and any(key.startswith("model.diffusion_model.") for key in shapes):
        return family
    what = OTHER_FAMILIES.get(family, "not a Stable Diffusion 1.x, 2.x or SDXL checkpoint")
    raise UserError(f"{where} is {what}; diffferv loads single files of Stable Diffusion 1.x, 2.x and SDXL base "
                    "(UNet latent diffusion with CLIP text encoders).")


def prediction_of(family: str, shapes: dict[str, tuple], path: Path, requested: str | None) -> str:
    if requested:
        return requested
    if "v_pred" in shapes:
        return "v_prediction"
    if family != "v2":
        return "epsilon"
    step = None
    if path.suffix == ".ckpt":
        step = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True).get("global_step")
    return "epsilon" if step == 875000 else "v_prediction"


def check_single_file(path: Path) -> None:
    from diffferv_cli.models.loading import _not_available

    if not path.is_file():
        raise _not_available(str(path), "no such file")
    if path.suffix not in (".safetensors", ".ckpt"):
        raise _not_available(str(path), "a single-file model is a .safetensors (or .ckpt) checkpoint")
    shapes, _ = read_shapes(path)
    detect_family(shapes, f"The checkpoint {path}")


def config_folder(family: str, shapes: dict[str, tuple], prediction_type: str) -> Path:
    """The family's configs from the local Hugging Face cache when they are all there and fit the file,
    else the shipped skeleton (written under the diffferv cache)."""
    from diffferv_cli.editing.cache import cache_root
    from diffferv_cli.models.skeletons import skeleton_folder, unet_config

    cached = _hub_config(CONFIG_REPOS[family], second=family == "xl_base")
    if cached is not None:
        unet = json.loads((cached / "unet" / "config.json").read_text())
        wanted = unet_config(shapes, family)
        if list(unet.get("block_out_channels", [])) == list(wanted["block_out_channels"]):
            return cached
    return skeleton_folder(shapes, family, prediction_type, cache_root(None) / "model-configs")


def _hub_config(repo: str, second: bool = False) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache

        index = try_to_load_from_cache(repo, "model_index.json")
        if not isinstance(index, str):
            return None
        folder = Path(index).parent
        needed = ["unet/config.json", "vae/config.json", "text_encoder/config.json", "tokenizer/vocab.json",
                  "tokenizer/merges.txt", "scheduler/scheduler_config.json"]
        if second:  # SDXL's second encoder and tokenizer
            needed += ["text_encoder_2/config.json", "tokenizer_2/vocab.json", "tokenizer_2/merges.txt"]
        for name in needed:
            if not isinstance(try_to_load_from_cache(repo, name), str):
                return None
        return folder
    except Exception:  # noqa: BLE001 - an unusable cache is a cache without the configs
        return None


def load_single_file(path: Path, dtype: torch.dtype, prediction_type: str | None = None) -> Components:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel, CLIPTokenizer

    from diffferv_cli.models.loading import _not_available

    shapes, _ = read_shapes(path)
    family = detect_family(shapes, f"The checkpoint {path}")
    prediction = prediction_of(family, shapes, path, prediction_type)
    folder = config_folder(family, shapes, prediction)
    fingerprint = content_fingerprint(path)
    try:
        if path.suffix == ".ckpt":
            checkpoint = _ckpt_state(path)
        else:
            from safetensors.torch import load_file

            checkpoint = load_file(str(path))
        common = dict(config=str(folder), torch_dtype=dtype, local_files_only=True)
        unet = UNet2DConditionModel.from_single_file(checkpoint, subfolder="unet", **common)
        vae = AutoencoderKL.from_single_file(checkpoint, subfolder="vae", **common)
        text_encoder = create_diffusers_clip_model_from_ldm(CLIPTextModel, checkpoint, subfolder="text_encoder",
                                                            **common)
        tokenizer = CLIPTokenizer.from_pretrained(str(folder), subfolder="tokenizer", local_files_only=True)
        scheduler = dict(DDIMScheduler.load_config(str(folder), subfolder="scheduler", local_files_only=True))
        second = {}
        if family == "xl_base":
            from transformers import CLIPTextModelWithProjection

            second = dict(text_encoder_2=create_diffusers_clip_model_from_ldm(
                CLIPTextModelWithProjection, checkpoint, subfolder="text_encoder_2", **common),
                tokenizer_2=CLIPTokenizer.from_pretrained(str(folder), subfolder="tokenizer_2", local_files_only=True))
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - diffusers raises many types here; all mean "cannot load"
        raise _not_available(str(path), f"the checkpoint could not be loaded: {(str(err).splitlines() or [''])[0]}") from err
    modules = {"unet": unet, "vae": vae, "text_encoder": text_encoder, "text_encoder_2": second.get("text_encoder_2")}
    for name, module in ((name, module) for name, module in modules.items() if module is not None):
        missing = [key for key, tensor in module.state_dict().items() if getattr(tensor, "is_meta", False)]
        if missing:  # diffusers leaves what the file lacks unloaded
            raise _not_available(str(path), f"the checkpoint has no weights for {name} {missing[0]} "
                                            f"(and {len(missing) - 1} more)")
    scheduler["prediction_type"] = prediction
    return Components(unet, vae, text_encoder, tokenizer, scheduler, model_id=str(path.resolve()),
                      fingerprint=f"file-sha256-{fingerprint}", **second)


def content_fingerprint(path: Path, chunk: int = 1 << 24) -> str:
    """The file's SHA-256 (first 24 hex digits), hashed once per (path, size, mtime, inode)."""
    from filelock import FileLock

    from diffferv_cli.editing.cache import cache_root
    from diffferv_cli.files import atomic_write_json

    stat = path.stat()
    index_path = cache_root(None) / "model-fingerprints.json"
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ino}"
    index: dict = {}
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text())
        except (OSError, ValueError):
            index = {}
    if isinstance(index.get(key), str):
        return index[key]
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    value = digest.hexdigest()[:24]
    try:
        index_path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(index_path) + ".lock", timeout=10):
            fresh = json.loads(index_path.read_text()) if index_path.is_file() else {}
            fresh = {name: hashed for name, hashed in fresh.items() if _still_there(name)}
            fresh[key] = value
            atomic_write_json(index_path, fresh)
    except (OSError, ValueError):  # an index that cannot be kept only costs a hash next time
        pass
    return value


def _still_there(key: str) -> bool:
    path, size, mtime, inode = key.rsplit("|", 3)
    try:
        stat = os.stat(path)
    except OSError:
        return False
    return f"{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ino}" == f"{size}|{mtime}|{inode}"
