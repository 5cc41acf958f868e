"""One checkpoint file in the original Stable Diffusion layout, loaded offline."""

from __future__ import annotations

from pathlib import Path

import torch

from diffferv_cli.models.components import Components
from diffferv_cli.models.families import SD15_SCHEDULER


def check_single_file(path: Path) -> None:
    from diffferv_cli.models.loading import _not_available

    if not path.is_file():
        raise _not_available(str(path), "no such file")


def load_single_file(path: Path, dtype: torch.dtype, prediction_type: str | None = None) -> Components:
    from diffusers import StableDiffusionPipeline

    from diffferv_cli.models.loading import _not_available

    try:
        pipe = StableDiffusionPipeline.from_single_file(str(path), torch_dtype=dtype, safety_checker=None)
    except Exception as err:  # noqa: BLE001 - diffusers raises many types here; all mean "cannot load"
        raise _not_available(str(path), f"the checkpoint could not be loaded: {str(err).splitlines()[0]}") from err
    stat = path.stat()
    return Components(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, dict(SD15_SCHEDULER),
                      model_id=str(path.resolve()),
                      fingerprint=f"file-{path.name}-{stat.st_size}-{int(stat.st_mtime)}")
