"""Which device and dtype a command runs on."""

from __future__ import annotations

import torch

from diffferv_cli.errors import UserError

DEVICE_NAMES = "auto, cpu, cuda, cuda:N or mps"


def pick_device(requested: str | None = None) -> torch.device:
    """`requested` if given (checked: a known kind that this machine has), else cuda > mps > cpu."""
    if requested and requested != "auto":
        kind, _, index = requested.strip().lower().partition(":")
        if kind not in ("cpu", "cuda", "mps") or (index and (not index.isdigit() or kind != "cuda")):
            raise UserError(f"Unknown device {requested!r}; use {DEVICE_NAMES}.")
        if kind == "cuda":
            if not torch.cuda.is_available():
                raise UserError(f"--device {requested} was asked for but CUDA is not available on this machine.")
            count = torch.cuda.device_count()
            if index and int(index) >= count:
                raise UserError(f"--device {requested}: this machine has {count} CUDA device(s), "
                                f"cuda:0 to cuda:{count - 1}.")
        if kind == "mps" and not (getattr(torch.backends, "mps", None) is not None
                                  and torch.backends.mps.is_available()):
            raise UserError(f"--device {requested} was asked for but MPS (Apple GPU) is not available here.")
        if not index and kind == "cuda":
            from diffferv_cli.temporal.ranks import rank_device

            return rank_device(torch.device("cuda"))
        return torch.device(f"{kind}:{int(index)}" if index else kind)
    if torch.cuda.is_available():
        from diffferv_cli.temporal.ranks import rank_device

        return rank_device(torch.device("cuda"))  # each rank of a torchrun job on its own GPU
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(device: torch.device, requested: str | None = None) -> torch.dtype:
    """fp16 on GPUs, fp32 on CPU, unless asked otherwise."""
    names = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
             "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if requested and requested != "auto":
        if requested not in names:
            raise UserError(f"Unknown dtype {requested!r}; use one of fp32, fp16, bf16.")
        return names[requested]
    return torch.float16 if device.type in ("cuda", "mps") else torch.float32
