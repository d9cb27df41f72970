"""Checkpoint files: atomic group-readable writes, safe (weights_only) reads, and finding the
newest one that loads."""
from __future__ import annotations

import glob
import os
import re
import tempfile
from typing import Any, Callable, Sequence

import torch

from util.files import current_umask, first_line, one_sentence_write_errors

TMP_PREFIX = ".tmp-"
CHECKPOINT_NAME = re.compile(r"(\d+)\.pt")


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


class WeightsError(CheckpointError):
    """A source (file, folder, name, hub repo, state dict) that gives no DiT weights, or weights
    that do not fit the model asked for."""


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
        raise CheckpointError(
            f"could not read checkpoint {path}: the file is corrupt, truncated or holds more than "
            f"tensors and plain values ({first_line(error)})"
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


def checkpoints_newest_first(results_dir: str, name: str) -> list[str]:
    """The checkpoints (checkpoints/<step>.pt) of every run results_dir/NNN-<name>, the newest
    run first and, within a run, the highest step first."""
    runs = []
    if os.path.isdir(results_dir):
        runs = [(int(m.group(1)), entry) for entry in os.listdir(results_dir) if (m := re.fullmatch(rf"(\d+)-{re.escape(name)}", entry))]
    paths = []
    for _, run in sorted(runs, reverse=True):
        folder = os.path.join(results_dir, run, "checkpoints")
        entries = os.listdir(folder) if os.path.isdir(folder) else []
        steps = [(int(m.group(1)), entry) for entry in entries if (m := CHECKPOINT_NAME.fullmatch(entry))]
        paths += [os.path.join(folder, entry) for _, entry in sorted(steps, reverse=True)]
    return paths


def remove_stale_temporaries(folder: str) -> list[str]:
    """Delete the temporary files of checkpoint writes that a kill interrupted; returns their paths.

    Call it before this run writes checkpoints into `folder`: a temporary is a whole checkpoint.
    """
    stale = sorted(glob.glob(os.path.join(glob.escape(folder), f"{TMP_PREFIX}*.pt")))
    for path in stale:
        os.remove(path)
    return stale


def load_newest_good_checkpoint(
    paths: Sequence[str], warn: Callable[[str], None], map_location: str | torch.device = "cpu"
) -> tuple[str, Any] | None:
    """The first of `paths` (newest first) that loads, with its contents; None when there are none.

    A file that does not load (truncated by a crash, corrupt) is skipped with one line through
    `warn`; when none loads, CheckpointError says so.
    """
    for path in paths:
        try:
            return path, load_checkpoint(path, map_location)
        except (ValueError, FileNotFoundError) as error:
            warn(f"skipping checkpoint {path}: it does not load ({first_line(error.__cause__ or error)}), so it can be deleted")
    if paths:
        raise CheckpointError(
            f"none of the {len(paths)} checkpoints loads (the newest is {paths[0]})", remedy="delete them", instead="a checkpoint to resume from"
        )
    return None
