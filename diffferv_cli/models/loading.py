"""Real weights: a Hugging Face hub id, a local diffusers folder or one checkpoint file, onto a device.

* a hub id (default `stable-diffusion-v1-5/stable-diffusion-v1-5`) goes through the normal Hugging Face
  cache: the cache is tried first, the network only when it misses (after one quick probe);
* a local diffusers folder (`model_index.json` with `unet/`, `vae/`, `text_encoder/`, `tokenizer/`);
* one `.safetensors` checkpoint in the original Stable Diffusion layout (models/single_file.py);
* `tiny-random` (models/tiny.py).

Each model comes with its own scheduler config (models/families.py); `prediction_type` overrides its
prediction type and `clip_skip` picks an earlier layer of the text encoder, as diffusers' pipelines do.
Raises `UserError` with one sentence when the model cannot be had; a pickled weight file that is not a
plain state dict is named and never run (models/pickled.py), and weights that leave some of a model's
tensors unloaded are refused rather than filled at random.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from pickle import UnpicklingError
from typing import Any

import torch

from diffferv_cli.config import DEFAULT_MODEL
from diffferv_cli.errors import UserError
from diffferv_cli.models.components import Components
from diffferv_cli.models.devices import pick_device, pick_dtype
from diffferv_cli.models.families import SD15_SCHEDULER, check_pipeline_class, ddim_config
from diffferv_cli.models.pickled import refuse_foreign_weights
from diffferv_cli.models.tiny import TINY_MODELS


def _not_available(model: str, reason: str) -> UserError:
    """One sentence: what was asked, why it cannot be had, and what to pass instead -- a file that is
    not a usable checkpoint is not told to pass a checkpoint file."""
    if Path(model).suffix in (".safetensors", ".ckpt"):
        advice = "pass another checkpoint, a diffusers folder or a hub id with --model"
    else:
        advice = (f"pass --model with a local diffusers folder or a .safetensors checkpoint, or download it once "
                  f"with network access (default: {DEFAULT_MODEL})")
    return UserError(f"Model {model!r} is not available ({reason}); {advice}.")


def _folder_fingerprint(folder: Path) -> str:
    """Configs by content, weight files by name, size and mtime (hashing gigabytes would take minutes)."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        rel = path.relative_to(folder).as_posix()
        if path.suffix in (".json", ".txt"):
            digest.update(rel.encode() + path.read_bytes())
        else:
            stat = path.stat()
            digest.update(f"{rel}:{stat.st_size}:{int(stat.st_mtime)}".encode())
    return digest.hexdigest()[:16]


WEIGHT_SUBFOLDERS = ("unet", "vae", "text_encoder", "text_encoder_2")  # the subfolders whose weights load


def _weights(model_class, source: str, subfolder: str, dtype: torch.dtype, common: dict):
    """`model_class.from_pretrained(source, subfolder)`, refused in one sentence when its weight file leaves
    some of the model's tensors unloaded (a state dict of another model or an empty one: transformers would
    initialise them at random without a word, diffusers leave them on the meta device)."""
    model, info = model_class.from_pretrained(source, subfolder=subfolder, torch_dtype=dtype,
                                              output_loading_info=True, **common)
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise _not_available(source, f"the weights in {subfolder}/ lack {len(missing)} of the model's tensors, "
                                     f"{missing[0]} first")
    return model


def _load_from_pretrained(source: str, local_only: bool, revision: str | None, dtype: torch.dtype) -> tuple:
    """(unet, vae, text_encoder, tokenizer, scheduler config) of a diffusers folder or hub id."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    common: dict[str, Any] = dict(local_files_only=local_only)
    if revision:
        common["revision"] = revision
    tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **common)
    text_encoder = _weights(CLIPTextModel, source, "text_encoder", dtype, common)
    vae = _weights(AutoencoderKL, source, "vae", dtype, common)
    unet = _weights(UNet2DConditionModel, source, "unet", dtype, common)
    second = {}
    if unet.config.get("addition_embed_type") == "text_time":  # SDXL: the second encoder gives the pooled text
        from transformers import CLIPTextModelWithProjection

        second = dict(tokenizer_2=CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2", **common),
                      text_encoder_2=_weights(CLIPTextModelWithProjection, source, "text_encoder_2", dtype, common))
    try:
        scheduler = dict(DDIMScheduler.load_config(source, subfolder="scheduler", **common))
    except (OSError, ValueError):  # a folder without scheduler/: SD 1.x's schedule
        scheduler = dict(SD15_SCHEDULER)
    return unet, vae, text_encoder, tokenizer, scheduler, second


def check_model(model: str) -> None:
    """What can be said of `model` without loading a weight (UserError, one sentence): the file or folder
    exists, the family is one diffferv drives, a hub id is well formed. Commands call it before decoding."""
    if model in TINY_MODELS:
        return
    path = Path(model).expanduser()
    if path.suffix in (".safetensors", ".ckpt") or path.is_file():
        from diffferv_cli.models.single_file import check_single_file

        check_single_file(path)
    elif path.is_dir():
        check_pipeline_class(_folder_index(path).get("_class_name"), f"The model folder {path}")
        if not (path / "unet").is_dir():
            raise _not_available(str(path), "the folder has no unet/ subfolder, so it is not a diffusers model")
    elif model.count("/") != 1 or model.startswith((".", "/", "~")):
        raise _not_available(model, "it is neither a file, a folder nor a hub id like owner/name")


def load_components(
    model: str = DEFAULT_MODEL,
    device: str | None = None,
    dtype: str | None = None,
    revision: str | None = None,
    prediction_type: str | None = None,
    clip_skip: int | None = None,
    loras: Sequence[tuple[str | Path, float]] = (),
) -> Components:
    """Load `model` (hub id, folder, `.safetensors` file or `tiny-random`) onto a device.

    `prediction_type` overrides the model's (epsilon, v_prediction, sample); `clip_skip` as in diffusers'
    pipelines (1: the layer before the last); `loras` are (file, scale) pairs fused into the weights in
    order (models/lora.py). Raises `UserError` with one sentence when the model cannot be had, is not a
    family diffferv drives, or a LoRA is not one or does not fit."""
    if loras:  # a wrong LoRA file is refused before the model's weights are read
        from diffferv_cli.models.lora import lora_file

        loras = [(lora_file(Path(path)), scale) for path, scale in loras]
    torch_device = pick_device(device)
    torch_dtype = pick_dtype(torch_device, dtype)
    check_model(model)
    if model in TINY_MODELS:
        comps = TINY_MODELS[model]().to(torch_device, torch.float32 if dtype in (None, "auto") else torch_dtype)
    else:
        path = Path(model).expanduser()
        if path.suffix in (".safetensors", ".ckpt") or path.is_file():
            from diffferv_cli.models.single_file import load_single_file

            comps = load_single_file(path, torch_dtype, prediction_type)
        elif path.is_dir():
            comps = _load_folder(path, torch_dtype)
        else:
            comps = _load_hub(model, revision, torch_dtype)
        for module in (comps.unet, comps.vae, *comps.text_encoders):
            module.eval().requires_grad_(False)
        comps = comps.to(torch_device)
    if loras:
        from diffferv_cli.models.lora import apply_loras

        comps = apply_loras(comps, loras)
    return with_options(comps, prediction_type, clip_skip)


def with_options(comps: Components, prediction_type: str | None, clip_skip: int | None) -> Components:
    """`comps` sampled with `prediction_type` (None: the model's own) and reading its text encoder
    `clip_skip` layers early; both enter `Components.identity`, so the cache tells them apart."""
    comps.scheduler_config = ddim_config(comps.scheduler_config, prediction_type)
    if clip_skip:
        layers = comps.text_encoder.config.num_hidden_layers
        if clip_skip >= layers:
            raise UserError(f"--clip-skip {clip_skip} is too large: the text encoder has {layers} layers.")
        comps.clip_skip = clip_skip
    return comps


def _folder_index(path: Path) -> dict:
    index = path / "model_index.json"
    if not index.is_file():
        return {}
    try:
        return json.loads(index.read_text())
    except (OSError, ValueError) as err:
        raise _not_available(str(path), f"its model_index.json cannot be read: {err}") from None


def _load_folder(path: Path, dtype: torch.dtype) -> Components:
    refuse_foreign_weights(f"Model {str(path)!r}", [path / name for name in WEIGHT_SUBFOLDERS])
    try:
        *parts, scheduler, second = _load_from_pretrained(str(path), True, None, dtype)
    except UnpicklingError:  # a pickle the check above let through: the loaders' weights_only refused it
        raise _not_available(str(path), "a weight file in it is a pickle that could run code; convert it to "
                                        ".safetensors") from None
    except (OSError, ValueError) as err:
        raise _not_available(str(path), f"the folder could not be read: {str(err).splitlines()[0]}") from err
    return Components(*parts, scheduler_config=scheduler, model_id=str(path.resolve()),
                      fingerprint="folder-" + _folder_fingerprint(path), **second)


HUB_PROBE_SECONDS = 5.0  # how long to wait for any answer from the hub before saying it cannot be reached


def hub_offline() -> bool:
    """HF_HUB_OFFLINE set to a true value (huggingface_hub's own rule)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_reachable(timeout: float = HUB_PROBE_SECONDS) -> tuple[bool, str]:
    """(True, "") when the Hugging Face endpoint answers anything at all within `timeout` seconds, else
    (False, why). One request, no retries, through huggingface_hub's own HTTP session (so its proxy and
    endpoint settings apply); run in a helper thread, so that a name lookup that hangs cannot hold the
    caller past `timeout` either."""
    import threading

    from huggingface_hub import constants, get_session

    answer: dict[str, str] = {}

    def probe() -> None:
        try:
            get_session().head(constants.ENDPOINT, timeout=timeout)
            answer["ok"] = ""
        except Exception as err:  # noqa: BLE001 - any failure means "not reachable"
            answer["error"] = (str(err).splitlines() or [type(err).__name__])[0] or type(err).__name__

    thread = threading.Thread(target=probe, name="diffferv-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    if "ok" in answer:
        return True, ""
    return False, answer.get("error", f"no answer within {timeout:g} s")


def _load_hub(model: str, revision: str | None, dtype: torch.dtype) -> Components:
    """The local Hugging Face cache first; the network only when the model is not there, HF_HUB_OFFLINE
    is not set and one quick request shows that the hub answers, so that a machine without network fails
    in seconds rather than after the download's retries."""
    parts = None
    if _in_hub_cache(model, revision):  # asked without importing diffusers: the failure path stays quick
        _check_hub_class(model, revision)
        snapshot = _hub_snapshot(model, revision)
        if snapshot is not None:
            refuse_foreign_weights(f"Model {model!r}", [snapshot / name for name in WEIGHT_SUBFOLDERS])
        try:
            parts = _load_from_pretrained(model, True, revision, dtype)
        except (OSError, ValueError):  # partly cached: the hub may complete it
            parts = None
    if parts is None:
        if hub_offline():
            raise _not_available(model, "not in the Hugging Face cache and HF_HUB_OFFLINE is set") from None
        reachable, why = hub_reachable()
        if not reachable:
            raise _not_available(model, f"not in the Hugging Face cache and the hub cannot be reached: {why}") from None
        try:
            from huggingface_hub import hf_hub_download

            hf_hub_download(model, "model_index.json", revision=revision)  # a few hundred bytes first:
            _check_hub_class(model, revision)  # another family is refused before gigabytes of weights
            parts = _load_from_pretrained(model, False, revision, dtype)
        except UnpicklingError:  # the loaders read pickles with weights_only: refused, never run
            raise _not_available(model, "a weight file of it on the hub is a pickle that could run code") from None
        except (OSError, ValueError) as err:
            reason = (str(err).splitlines() or [type(err).__name__])[0]
            raise _not_available(model, f"the download from the hub failed: {reason}") from None
    commit = _hub_commit(model, revision)
    *modules, scheduler, second = parts
    return Components(*modules, scheduler_config=scheduler, model_id=model,
                      fingerprint=f"hub-{model}@{commit or revision or 'main'}", **second)


def _in_hub_cache(model: str, revision: str | None) -> bool:
    """Whether the local Hugging Face cache holds the model's UNet config (the rest is checked on load)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(model, "unet/config.json", revision=revision), str)
    except Exception:  # noqa: BLE001 - an unusable cache is a cache without the model
        return False


def _check_hub_class(model: str, revision: str | None) -> None:
    """A cached hub model of a family diffferv cannot drive is refused before its weights load."""
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, "model_index.json", revision=revision)
        name = json.loads(Path(cached).read_text()).get("_class_name") if isinstance(cached, str) else None
    except (OSError, ValueError):
        return
    check_pipeline_class(name, f"The model {model}")


def _hub_snapshot(model: str, revision: str | None) -> Path | None:
    """The folder of the cached snapshot of `model`, when the cache has one."""
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, "model_index.json", revision=revision)
    except Exception:  # noqa: BLE001 - an unusable cache is a cache without the model
        return None
    return Path(cached).parent if isinstance(cached, str) else None


def _hub_commit(model: str, revision: str | None) -> str | None:
    """The commit hash the cached snapshot resolves to, when the cache knows it."""
    snapshot = _hub_snapshot(model, revision)
    return snapshot.name if snapshot is not None else None


def default_model_cached(model: str = DEFAULT_MODEL) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(model, "unet/config.json"), str)
    except Exception:  # noqa: BLE001 - doctor only reports
        return False


def save_components(comps: Components, folder: Path) -> None:
    """Write a diffusers-layout folder that `load_components(folder)` reads back."""
    folder.mkdir(parents=True, exist_ok=True)
    comps.unet.save_pretrained(folder / "unet")
    comps.vae.save_pretrained(folder / "vae")
    comps.text_encoder.save_pretrained(folder / "text_encoder")
    comps.tokenizer.save_pretrained(folder / "tokenizer")
    if comps.text_encoder_2 is not None:
        comps.text_encoder_2.save_pretrained(folder / "text_encoder_2")
        comps.tokenizer_2.save_pretrained(folder / "tokenizer_2")
    from diffusers import DDIMScheduler

    DDIMScheduler(**comps.scheduler_config).save_pretrained(folder / "scheduler")  # the model's own schedule
    from diffferv_cli.models.skeletons import pipeline_index

    index = pipeline_index(sdxl=comps.text_encoder_2 is not None)
    from diffferv_cli.files import atomic_write_json

    atomic_write_json(folder / "model_index.json", index)


# --------------------------------------------------------------------------------------------------
# models around the diffusion model: captioning and evaluation
# --------------------------------------------------------------------------------------------------
