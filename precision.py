"""Numeric precision modes shared by the scripts: fp32, tf32 and bf16 autocast."""
from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("fp32", "tf32", "bf16")


def configure_precision(precision: str) -> None:
    """Allow TF32 matmuls on Ampere+ GPUs for tf32 and bf16 (no effect on a CPU)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    allow_tf32 = precision in ("tf32", "bf16")
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    torch.backends.cudnn.allow_tf32 = allow_tf32


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast for `bf16` (fp32 weights stay the master copy); a no-op otherwise."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
