"""Checkpoint I/O: atomic writes and safe (weights_only) reads with clear errors."""
from __future__ import annotations

import os
import tempfile
from typing import Any

import torch


def save_checkpoint(obj: Any, path: str) -> None:
    """torch.save to a temporary file in the same folder, then rename it over `path`.

    A run killed mid-write leaves the previous file intact and no half-written checkpoint.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> Any:
    """torch.load with weights_only=True; a missing, truncated or unsafe file gets one clear sentence."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # a damaged file can fail anywhere in the unpickler, with any error type
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"could not read checkpoint {path}: the file is corrupt, truncated or holds more than "
            f"tensors and plain values ({first_line})"
        ) from error


def model_weights(checkpoint: dict) -> dict:
    """The weights to sample with: the EMA copy of a training checkpoint, else the dict itself."""
    return checkpoint["ema"] if isinstance(checkpoint, dict) and "ema" in checkpoint else checkpoint


def missing_entries(checkpoint: Any, keys: tuple[str, ...]) -> list[str]:
    """The entries of `keys` that a loaded checkpoint lacks (all of them if it is not a dict)."""
    return [key for key in keys if not isinstance(checkpoint, dict) or key not in checkpoint]


def setting_differences(saved: dict, current: dict, keys: tuple[str, ...]) -> list[str]:
    """'--flag saved (now current)' for each setting of `keys` that differs between the two."""
    return [
        f"--{key.replace('_', '-')} {saved.get(key)} (now {current.get(key)})" for key in keys if saved.get(key) != current.get(key)
    ]
