"""Checkpoint files: atomic group-readable writes, safe (weights_only) reads, the names of a
run's checkpoints and the temporaries an interrupted write leaves."""
from __future__ import annotations

import glob
import os
import re
import tempfile
from typing import Any

import torch

from util.files import current_umask, first_line, one_sentence_write_errors

TMP_PREFIX = ".tmp-"
CHECKPOINT_NAME = re.compile(r"(\d+)\.pt")


def save_checkpoint(obj: Any, path: str) -> None:
    """torch.save to a temporary file in the same folder, then rename it over `path`.

    A run killed mid-write leaves the previous file intact and no half-written checkpoint. The
    file gets the mode a plain open() would give (0644 under the usual umask), so a group can
    read it on a shared cluster. A full or read-only disk raises WriteError with one sentence;
    the temporary file is removed and earlier checkpoints are untouched.
    """
    folder = os.path.dirname(os.path.abspath(path))
    with one_sentence_write_errors(path, "write checkpoint"):
        os.makedirs(folder, exist_ok=True)
        fd, tmp_path = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=".pt", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), 0o666 & ~current_umask())  # mkstemp creates files as 0600
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
        raise ValueError(
            f"could not read checkpoint {path}: the file is corrupt, truncated or holds more than "
            f"tensors and plain values ({first_line(error)})"
        ) from error


def model_weights(checkpoint: dict) -> dict:
    """The weights to sample with: the EMA copy of a training checkpoint, else the dict itself."""
    return checkpoint["ema"] if isinstance(checkpoint, dict) and "ema" in checkpoint else checkpoint


def remove_stale_temporaries(folder: str) -> list[str]:
    """Delete the temporary files of checkpoint writes that a kill interrupted; returns their paths.

    Call it before this run writes checkpoints into `folder`: a temporary is a whole checkpoint.
    """
    stale = sorted(glob.glob(os.path.join(glob.escape(folder), f"{TMP_PREFIX}*.pt")))
    for path in stale:
        os.remove(path)
    return stale
