"""Checkpoint files: atomic group-readable writes with a content checksum, safe (weights_only)
memory-mapped reads that check it, the names of a run's checkpoints and the temporaries an
interrupted write leaves."""
from __future__ import annotations

import glob
import hashlib
import os
import re
import zipfile
from typing import Any

import torch

from util.files import atomic_open, first_line, one_sentence_write_errors

TMP_PREFIX = ".tmp-"
CHECKPOINT_NAME = re.compile(r"(\d+)\.pt")
# The entry of a saved dict that holds content_digest of all its other entries. torch's zip
# reader checks no CRC, so without it a damaged byte inside a tensor loads as a wrong weight.
CHECKSUM_KEY = "checksum"
CHECKSUM_MISMATCH = "its content does not match the checksum written with it (the file changed after it was saved)"


class CheckpointError(ValueError):
    """A checkpoint that could not be used, in one sentence: what was tried, what would help
    (`remedy`), and what could be given in its place (`instead`). Library code never names a
    command-line flag; a script puts its own into the sentence with `with_flag`."""

    def __init__(self, what: str, remedy: str | None = None, instead: str | None = None):
        self.what, self.remedy, self.instead = what, remedy, instead
        super().__init__(self.sentence(f"use {instead} instead" if instead else None))

    def sentence(self, alternative: str | None) -> str:
        advice = [part for part in (self.remedy, alternative) if part]
        return "; ".join([self.what, ", or ".join(advice)]) if advice else self.what

    def with_flag(self, option: str) -> str:
        """The sentence a script prints, naming `option` (e.g. "--ckpt PATH") as the way to give
        the alternative: "...; pass --ckpt PATH to a local checkpoint"."""
        return self.sentence(f"pass {option} to {self.instead}" if self.instead else None)

    def __reduce__(self) -> tuple:
        # Rebuilt from its parts when sent to the other processes (a pickled exception gets its message alone).
        return type(self), (self.what, self.remedy, self.instead)


class WeightsError(CheckpointError):
    """A source (file, folder, name, hub repo, state dict) that gives no DiT weights, or weights
    that do not fit the model asked for."""


class ChecksumError(CheckpointError):
    """A checkpoint whose content differs from the checksum saved in it: damaged after the write."""


def update_digest(digest: Any, value: Any) -> None:
    """Feed `value` to a hashlib object in a canonical, unambiguous form: dicts as their keys in
    order with their values, lists and tuples item by item, tensors as dtype, shape and raw
    bytes, anything else as its repr; every part is prefixed by its kind and length."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"tensor {tensor.dtype} {tuple(tensor.shape)}:".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())  # no copy of a CPU tensor
    elif isinstance(value, dict):
        digest.update(f"dict {len(value)}:".encode())
        for key, item in value.items():
            update_digest(digest, key)
            update_digest(digest, item)
    elif isinstance(value, (list, tuple)):
        digest.update(f"{type(value).__name__} {len(value)}:".encode())
        for item in value:
            update_digest(digest, item)
    else:
        text = repr(value).encode()
        digest.update(f"value {len(text)}:".encode() + text)


def content_digest(value: Any) -> str:
    """"sha256:<hex>" of `value`'s content (see update_digest): equal for equal tensors and plain
    values whatever file, device or memory they sit in."""
    digest = hashlib.sha256()
    update_digest(digest, value)
    return f"sha256:{digest.hexdigest()}"


def with_checksum(obj: Any) -> Any:
    """A dict gets CHECKSUM_KEY, the digest of its other entries, as its last entry; anything else is kept."""
    if not isinstance(obj, dict):
        return obj
    content = {key: value for key, value in obj.items() if key != CHECKSUM_KEY}
    return {**content, CHECKSUM_KEY: content_digest(content)}


def verified_content(obj: Any, path: str) -> Any:
    """`obj` without its checksum entry, once its content matches it; ChecksumError if not.
    Files without one (the original's format, released weights, plain state dicts) pass as they are."""
    if not isinstance(obj, dict) or not isinstance(obj.get(CHECKSUM_KEY), str):
        return obj
    content = {key: value for key, value in obj.items() if key != CHECKSUM_KEY}
    if content_digest(content) != obj[CHECKSUM_KEY]:
        raise ChecksumError(f"checkpoint {path}: {CHECKSUM_MISMATCH}", instead="another checkpoint")
    return content


def save_checkpoint(obj: Any, path: str) -> None:
    """torch.save to a temporary file in the same folder, then rename it over `path`; a dict gets
    a checksum of its content as its last entry (see with_checksum), which load_checkpoint checks.

    A run killed mid-write leaves the previous file intact and no half-written checkpoint. The
    file gets the mode a plain open() would give (0644 under the usual umask), so a group can
    read it on a shared cluster. A full or read-only disk raises WriteError with one sentence;
    the temporary file is removed and earlier checkpoints are untouched.
    """
    folder = os.path.dirname(os.path.abspath(path))
    with one_sentence_write_errors(path, "write checkpoint"):
        os.makedirs(folder, exist_ok=True)
        # Named .tmp-*.pt, so that remove_stale_temporaries finds what a kill left.
        with atomic_open(path, "wb", temp_prefix=TMP_PREFIX, temp_suffix=".pt") as f:
            torch.save(with_checksum(obj), f)
            f.flush()
            os.fsync(f.fileno())


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> Any:
    """torch.load with weights_only=True, memory-mapped (processes that load one file share its
    pages), and its checksum checked and dropped; a missing, truncated, damaged or unsafe file
    gets one clear sentence (ChecksumError when only the checksum tells)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        # torch maps only its zip format (the default since torch 1.6); older files are read whole.
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as error:  # a damaged file can fail anywhere in the unpickler, with any error type
        raise CheckpointError(
            f"could not read checkpoint {path}: the file is corrupt, truncated or holds more than "
            f"tensors and plain values ({first_line(error)})"
        ) from error
    return verified_content(checkpoint, path)


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
