"""Where and in what precision: the device (CUDA when present, never assumed) and dtype by name."""

from __future__ import annotations

import torch

from .errors import WeloreError


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """The requested device, else CUDA when present, else CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise WeloreError(f"device {device!r} requested but CUDA is not available")
    return dev


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """'auto'/None keeps the checkpoint's dtype; otherwise a torch dtype by name."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise WeloreError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(table)}")
    return table[dtype]
