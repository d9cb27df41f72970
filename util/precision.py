"""Numeric precision modes shared by the scripts, and the choice that follows the hardware.

  fp32  plain float32
  tf32  float32 weights and results, TF32 tensor-core matmuls on Ampere+ GPUs (fp32 on a CPU)
  bf16  bf16 autocast; fp32 master weights, loss and diffusion arithmetic
  fp16  fp16 autocast with dynamic loss scaling in training (for GPUs without bf16: V100, T4)
  auto  bf16 where the device computes it natively, else tf32 on a GPU and fp32 on a CPU
"""
from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("auto", "fp32", "tf32", "bf16", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AMX-BF16 or AVX512-BF16); without them torch
    emulates bf16 matmuls, about 25x slower than fp32 on an AVX2 CPU."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def cpu_has_native_fp16() -> bool:
    """Whether this CPU has fp16 matrix instructions (AMX-FP16)."""
    return getattr(torch.cpu, "_is_amx_fp16_supported", lambda: False)()


def has_native_bf16(device: torch.device) -> bool:
    """bf16 in hardware: CUDA compute capability 8.0+ (A100, H100, ...), or a CPU with AMX/AVX512-BF16."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type == "cpu":
        return cpu_has_native_bf16()
    return False


def has_native_fp16(device: torch.device) -> bool:
    """fp16 in hardware: every CUDA GPU with tensor cores (7.0+), or a CPU with AMX-FP16."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (7, 0)
    return device.type == "cpu" and cpu_has_native_fp16()


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor})"
    if device.type == "cpu":
        return f"this CPU ({torch.backends.cpu.get_cpu_capability()})"
    return str(device)


def resolve_precision(requested: str, device: torch.device) -> tuple[str, str | None]:
    """The concrete precision for `requested` on `device`, and a line to log (or None).

    The line says what `auto` chose and why, or warns that an explicit bf16/fp16 will be
    emulated, i.e. much slower than fp32, on this device.
    """
    if requested not in PRECISIONS:
        raise ValueError(f"unknown precision {requested!r}; choose one of {', '.join(PRECISIONS)}")
    where = describe_device(device)
    if requested == "auto":
        if has_native_bf16(device):
            return "bf16", f"--precision auto chose bf16: {where} computes bf16 natively"
        fallback = "tf32" if device.type == "cuda" else "fp32"
        return fallback, f"--precision auto chose {fallback}: {where} has no native bf16"
    native = {"bf16": has_native_bf16, "fp16": has_native_fp16}.get(requested)
    if native is not None and not native(device):
        fallback = "tf32" if device.type == "cuda" else "fp32"
        return requested, (
            f"warning: {where} has no native {requested}, so --precision {requested} is emulated and much "
            f"slower than fp32 (about 25x on an AVX2 CPU); use --precision auto or {fallback}"
        )
    return requested, None


def configure_precision(precision: str) -> None:
    """Allow TF32 matmuls on Ampere+ GPUs for tf32, bf16 and fp16 (no effect on a CPU)."""
    if precision not in PRECISIONS or precision == "auto":
        raise ValueError(f"configure_precision needs a concrete precision (resolve 'auto' first), got {precision!r}")
    allow_tf32 = precision != "fp32"
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    torch.backends.cudnn.allow_tf32 = allow_tf32


def setup_precision(requested: str, device: torch.device) -> tuple[str, str | None]:
    """resolve_precision, then configure_precision: what every script does at start-up."""
    precision, message = resolve_precision(requested, device)
    configure_precision(precision)
    return precision, message


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 or fp16 autocast (the fp32 weights stay the master copy); a no-op otherwise."""
    if precision in AUTOCAST_DTYPES:
        return torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[precision])
    return contextlib.nullcontext()


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """Dynamic loss scaling for fp16 training (fp16 gradients underflow without it); a
    disabled, pass-through scaler for every other precision."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
