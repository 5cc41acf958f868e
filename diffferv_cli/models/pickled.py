"""Pickled weight files of a model folder (`pytorch_model.bin`, `diffusion_pytorch_model.bin` and their
shards), read as diffferv's loaders will read them, before they do: with `torch.load(weights_only=True)`,
which refuses any pickle that would build an object other than tensors and plain containers, so the code
of a foreign or malicious pickle never runs. A file that is refused, or that holds something other than a
state dict ({name: tensor}), is named in one sentence instead of failing deep inside transformers or
diffusers (an UnpicklingError, or a TypeError on the first `.keys()`).

Only the files the loaders read are looked at: transformers and diffusers read a `.bin` only when its
`.safetensors` counterpart is absent, and never read a Trainer's `training_args.bin` or `optimizer.pt`.
"""

from __future__ import annotations

import json
import pickle
import re
import warnings
import zipfile
from collections.abc import Iterable
from pathlib import Path

from diffferv_cli.errors import UserError

# stem of the pickled weights -> the safetensors files that, when present, are read instead
# (transformers: model.*, diffusers: diffusion_pytorch_model.*)
_PICKLED_STEMS = {
    "pytorch_model": ("model.safetensors", "model.safetensors.index.json"),
    "diffusion_pytorch_model": ("diffusion_pytorch_model.safetensors",
                                "diffusion_pytorch_model.safetensors.index.json"),
}


def pickled_weight_files(folder: Path) -> list[Path]:
    """The pickled weight files in `folder` (not its subfolders) that transformers or diffusers would read:
    `<stem>*.bin` and the shards its `<stem>.bin.index.json` names, for each stem without safetensors."""
    found: set[Path] = set()
    for stem, safe in _PICKLED_STEMS.items():
        if any((folder / name).is_file() for name in safe):
            continue
        found.update(path for path in folder.glob(f"{stem}*.bin") if path.is_file())
        index = folder / f"{stem}.bin.index.json"
        if index.is_file():
            try:
                shards = json.loads(index.read_text()).get("weight_map", {}).values()
            except (OSError, ValueError, AttributeError):
                continue  # the loader says what is wrong with its own index
            found.update(folder / shard for shard in shards if isinstance(shard, str) and (folder / shard).is_file())
    return sorted(found)


def why_not_a_state_dict(path: Path) -> str | None:
    """None when `path` loads with `weights_only=True` as a {name: tensor} mapping; else why not, in words
    (the end of a sentence that starts with the file's name)."""
    import torch

    try:
        mmap = zipfile.is_zipfile(path)  # torch.save's format since 1.6; mmap reads no tensor data now
        with warnings.catch_warnings():  # "Detected pickle protocol 4": the refusal below says it all
            warnings.simplefilter("ignore")
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        called = re.search(r"GLOBAL ([\w.]+)", str(err))
        asks = f" (it asks for {called.group(1)})" if called else ""
        return (f"is not a pickle of tensors alone{asks} and is not loaded, as that could run code in it; "
                "convert it to .safetensors from a source you trust")
    except EOFError:
        return "is empty or cut short"
    except (OSError, RuntimeError, ValueError) as err:
        return f"is not a readable weight file ({type(err).__name__}: {_first_line(err)})"
    if not isinstance(state, dict):
        return f"holds a {type(state).__name__}, not a state dict of tensors"
    for name, value in state.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            return f"is not a state dict of tensors (its entry {str(name)[:60]!r} is of type {type(value).__name__})"
    return None


def foreign_weight_file(folders: Iterable[Path]) -> tuple[Path, str] | None:
    """(file, why) for the first pickled weight file in `folders` that is not a plain state dict, or None."""
    for folder in folders:
        for path in pickled_weight_files(Path(folder)):
            reason = why_not_a_state_dict(path)
            if reason is not None:
                return path, reason
    return None


def refuse_foreign_weights(what: str, folders: Iterable[Path]) -> None:
    """UserError, one sentence naming the file, when a pickled weight file in `folders` is foreign;
    `what` names the model ("Model './mine'")."""
    found = foreign_weight_file(folders)
    if found is not None:
        path, reason = found
        raise UserError(f"{what} cannot be loaded: its weight file {path} {reason}.")


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
