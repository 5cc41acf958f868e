"""`diffferv doctor`: what works on this machine, what is missing, and how to get it."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    optional: bool = False


def run_checks(cache_dir: Path | None = None) -> list[Check]:
    """Every check; `cache_dir` is the inversion cache's folder (`--cache-dir`, default as `cache_root`)."""
    import torch

    from diffferv_cli.config import DEFAULT_MODEL
    from diffferv_cli.models.devices import pick_device
    from diffferv_cli.models.loading import default_model_cached

    checks: list[Check] = []
    try:
        from diffferv_cli.video.io import ffmpeg_version

        checks.append(Check("ffmpeg", True, ffmpeg_version()))
    except Exception as err:  # noqa: BLE001 - doctor reports every failure
        checks.append(Check("ffmpeg", False, str(err)))
    try:
        import av

        checks.append(Check("PyAV", True, f"av {av.__version__}, FFmpeg {av.ffmpeg_version_info} libraries (probing)"))
    except ImportError as err:
        checks.append(Check("PyAV", False, f"{err} (pip install av)"))
    device = pick_device(None)
    detail = f"torch {torch.__version__}, device {device}"
    if device.type == "cuda":
        detail += f" ({torch.cuda.get_device_name(device)})"
    checks.append(Check("torch", True, detail))
    cached = default_model_cached()
    checks.append(Check("default model", cached,
                        f"{DEFAULT_MODEL} {'is' if cached else 'is not'} in the Hugging Face cache"
                        + ("" if cached else " (downloaded on first use, or pass --model)"), optional=True))
    checks.append(_cache_check(cache_dir))
    for package, purpose in (("dlib", "identity metrics (pip install dlib-bin face-recognition-models)"),
                             ("face_recognition_models", "dlib's face models"),
                             ("face_alignment", "optional landmark backend (downloads weights at run time)"),
                             ("lpips", "LPIPS metric"),
                             ("bitsandbytes", "8-bit Adam for `diffferv train --8bit-adam`")):
        found = importlib.util.find_spec(package) is not None
        checks.append(Check(package, found, purpose, optional=True))
    return checks


def _cache_check(cache_dir: Path | None) -> Check:
    """Where the inversion cache is and how much it holds (`diffferv cache` lists and removes entries)."""
    from diffferv_cli.editing.cache import cache_root
    from diffferv_cli.editing.cache_admin import human_size, list_entries, total_size

    root = cache_root(cache_dir)
    entries = list_entries(root)
    held = f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}, {human_size(total_size(entries))}"
    return Check("inversion cache", True, f"{root}: {held}" + ("" if root.exists() else " (not created yet)"))
