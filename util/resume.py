"""The resume policy: which checkpoint continues a run, whether its settings allow it, and how
weights, optimizer, data position and random streams are restored from it exactly."""
from __future__ import annotations

import argparse
import logging
import os
import re
from datetime import datetime
from typing import Any, Callable, Sequence

import numpy as np
import torch

from util.checkpoints import (
    CHECKSUM_MISMATCH, CHECKPOINT_NAME, CheckpointError, ChecksumError, load_checkpoint, remove_stale_temporaries,
)
from util.distributed import DistInfo, all_gather_objects
from util.files import first_line, trim_metrics
from util.run_lock import try_lock
from util.run_state import Run, TrainState, micro_batch_size

# Checkpoint entries a resumable checkpoint must hold (the reference's four come first).
RESUME_KEYS = ("model", "ema", "opt", "args", "step", "epoch", "epoch_step", "world_size", "dataset_size", "rng")
# Settings a resumed run must share with its checkpoint.
RESUME_MATCHING_ARGS = (
    "model", "image_size", "num_classes", "global_batch_size", "global_seed", "ema_decay", "ema_warmup", "no_flip",
)
# What checkpoints that predate a matching setting were trained with.
SETTING_DEFAULTS = {"ema_warmup": False, "no_flip": False}

logger = logging.getLogger("dit")


class ResumeError(ValueError):
    """A checkpoint that cannot continue this run, in one sentence; `data_only` when nothing but
    the data differs."""

    def __init__(self, message: str, data_only: bool = False):
        super().__init__(message)
        self.data_only = data_only


def experiment_name(model: str) -> str:
    return model.replace("/", "-")


def missing_entries(checkpoint: Any, keys: tuple[str, ...]) -> list[str]:
    """The entries of `keys` that a loaded checkpoint lacks (all of them if it is not a dict)."""
    return [key for key in keys if not isinstance(checkpoint, dict) or key not in checkpoint]


def setting_differences(saved: dict, current: dict, keys: tuple[str, ...]) -> list[str]:
    """'--flag saved (now current)' for each setting of `keys` that differs between the two."""
    return [
        f"--{key.replace('_', '-')} {saved.get(key)} (now {current.get(key)})" for key in keys if saved.get(key) != current.get(key)
    ]


def data_differences(checkpoint: dict, args: argparse.Namespace, dataset_size: int, fingerprint: str | None) -> list[str]:
    """What differs between the data a checkpoint was trained on and this run's data.

    The image folder or feature store is compared by content (the datasets' fingerprint(), which
    the checkpoint records) when both have a fingerprint, so a copy or a link resumes; by path
    for checkpoints without one. Also compares the number of images."""
    saved, saved_fingerprint = checkpoint["args"], checkpoint.get("data_fingerprint")
    differences = []
    for key in ("data_path", "feature_path"):
        before, now = saved.get(key), getattr(args, key)
        flag, same_path = f"--{key.replace('_', '-')}", (before and os.path.abspath(before)) == (now and os.path.abspath(now))
        if before and now and saved_fingerprint and fingerprint:
            if saved_fingerprint != fingerprint:
                differences.append(f"{flag} {before} as it was then (its files differ now)" if same_path else f"{flag} {before} (now {now})")
        elif not same_path:
            differences.append(f"{flag} {before} (now {now})")
    if checkpoint["dataset_size"] != dataset_size:
        differences.append(f"a dataset of {checkpoint['dataset_size']} images (now {dataset_size})")
    return differences


def check_resumable(
    checkpoint: dict, path: str, args: argparse.Namespace, dataset_size: int, fingerprint: str | None = None
) -> None:
    """Raise ResumeError unless `checkpoint` continues this run's settings. The number of
    processes and the accumulation split may change: only the global batch decides the data order.
    Changed data passes when args.accept_changed_data is set."""
    missing = missing_entries(checkpoint, RESUME_KEYS)
    if missing:
        raise ResumeError(f"{path} is not a train.py checkpoint that can be resumed (it lacks {', '.join(missing)})")
    differences = setting_differences({**SETTING_DEFAULTS, **checkpoint["args"]}, vars(args), RESUME_MATCHING_ARGS)
    saved_null_label = checkpoint["args"].get("class_dropout_prob", 0.1) > 0  # older checkpoints: the default
    if saved_null_label != (args.class_dropout_prob > 0):
        differences.append(f"{'a' if saved_null_label else 'no'} null label (--class-dropout-prob {args.class_dropout_prob} now)")
    data = [] if args.accept_changed_data else data_differences(checkpoint, args, dataset_size, fingerprint)
    if differences or data:
        raise ResumeError(
            f"cannot resume from {path}: it was trained with {', '.join(differences + data)}; resume with the same settings",
            data_only=not differences,
        )


def run_folders_newest_first(results_dir: str, name: str) -> list[str]:
    """The run folders results_dir/NNN-<name>, the highest number first."""
    runs = []
    if os.path.isdir(results_dir):
        runs = [(int(m.group(1)), entry) for entry in os.listdir(results_dir) if (m := re.fullmatch(rf"(\d+)-{re.escape(name)}", entry))]
    return [os.path.join(results_dir, run) for _, run in sorted(runs, reverse=True)]


def checkpoints_in(folder: str) -> list[tuple[int, str]]:
    """(step, file name) of the checkpoints (<step>.pt) in `folder`, the highest step first."""
    entries = os.listdir(folder) if os.path.isdir(folder) else []
    return sorted(((int(m.group(1)), entry) for entry in entries if (m := CHECKPOINT_NAME.fullmatch(entry))), reverse=True)


def checkpoints_newest_first(results_dir: str, name: str) -> list[str]:
    """The checkpoints (checkpoints/<step>.pt) of every run results_dir/NNN-<name>, the newest
    run first and, within a run, the highest step first."""
    paths = []
    for run in run_folders_newest_first(results_dir, name):
        folder = os.path.join(run, "checkpoints")
        paths += [os.path.join(folder, entry) for _, entry in checkpoints_in(folder)]
    return paths


def load_newest_good_checkpoint(
    paths: Sequence[str], warn: Callable[[str], None], map_location: str | torch.device = "cpu"
) -> tuple[str, Any] | None:
    """The first of `paths` (newest first) that loads and matches its checksum, with its contents;
    None when there are none.

    A file that does not load (truncated by a crash, corrupt) or whose content changed since it
    was written is skipped with one line through `warn`; when none loads, CheckpointError says so.
    """
    for path in paths:
        try:
            return path, load_checkpoint(path, map_location)
        except ChecksumError:
            warn(f"skipping checkpoint {path}: {CHECKSUM_MISMATCH}, so it can be deleted")
        except (ValueError, FileNotFoundError) as error:
            warn(f"skipping checkpoint {path}: it does not load ({first_line(error.__cause__ or error)}), so it can be deleted")
    if paths:
        raise CheckpointError(
            f"none of the {len(paths)} checkpoints loads (the newest is {paths[0]})", remedy="delete them", instead="a checkpoint to resume from"
        )
    return None


def pick_resume_checkpoint(args: argparse.Namespace, notes: list[str]) -> tuple[str, Any] | None:
    """(path, contents) of the checkpoint args.resume names, or None: "auto" takes the newest
    checkpoint of the model that loads whole (a damaged one is skipped with a line in `notes`)."""
    if args.resume == "auto":
        return load_newest_good_checkpoint(checkpoints_newest_first(args.results_dir, experiment_name(args.model)), notes.append)
    return (args.resume, load_checkpoint(args.resume, map_location="cpu")) if args.resume else None


def raise_if_any_rank_failed(error: Exception | None) -> None:
    """Raise the first process's error on every process (a collective), so that no rank goes on alone."""
    errors = [error for error in all_gather_objects(error) if error is not None]
    if errors:
        raise errors[0]


def open_resume_checkpoint(
    args: argparse.Namespace, dataset_size: int, notes: list[str], is_main: bool = True, fingerprint: str | None = None
) -> tuple[dict | None, str | None]:
    """The checkpoint that args.resume names (checked against the settings) and its path, or (None, None).

    The first process picks it (see pick_resume_checkpoint) and tells the others its path, so
    that all continue from one file even where shared storage shows them different listings;
    each loads it to the CPU memory-mapped, so the processes of a node share one copy of its
    pages. Every process raises the same ValueError (ResumeError for a mismatch) in one sentence.
    """
    found, error = None, None
    if is_main:
        try:
            found = pick_resume_checkpoint(args, notes)
        except (ValueError, FileNotFoundError) as failure:
            error = failure
    raise_if_any_rank_failed(error)
    path = all_gather_objects(found[0] if found else None)[0]
    if path is None:
        return None, None
    checkpoint, error = (found[1] if found else None), None
    if not is_main:
        try:
            checkpoint = load_checkpoint(path, map_location="cpu")
        except (ValueError, FileNotFoundError) as failure:
            error = failure
    raise_if_any_rank_failed(error)
    check_resumable(checkpoint, path, args, dataset_size, fingerprint)
    return checkpoint, path


def tidy_resumed_folder(experiment_dir: str, step: int, set_aside_newer: bool) -> None:
    """Remove what a killed run left: temporary checkpoint files, and metrics records after the
    resumed step (this run logs those steps again) or cut off mid-line. With `set_aside_newer`
    (a checkpoint chosen by hand), checkpoints after `step` are moved aside, so that the run's
    newest checkpoint is always on the branch it trains."""
    folder = os.path.join(experiment_dir, "checkpoints")
    stale = remove_stale_temporaries(folder)
    if stale:
        logger.info(f"removed {len(stale)} stale temporary checkpoint file(s): {', '.join(stale)}")
    if set_aside_newer:
        set_aside_checkpoints_after(folder, step)
    dropped = trim_metrics(os.path.join(experiment_dir, "metrics.jsonl"), step)
    if dropped:
        logger.info(f"metrics.jsonl: dropped {dropped} record(s) after step {step} or cut off, as this run logs those steps again")


def set_aside_checkpoints_after(folder: str, step: int) -> None:
    """Move the checkpoints of `folder` after `step` into folder/set-aside-after-<step>-<time>/,
    where no resume looks, and log what went where."""
    newer = sorted(entry for saved_step, entry in checkpoints_in(folder) if saved_step > step)
    if not newer:
        return
    aside = os.path.join(folder, f"set-aside-after-{step:07d}-{datetime.now():%Y%m%d-%H%M%S}")
    os.makedirs(aside, exist_ok=True)
    for entry in newer:
        os.replace(os.path.join(folder, entry), os.path.join(aside, entry))
    logger.info(
        f"resuming from step {step}, before the newest checkpoint of the run: set aside {len(newer)} newer checkpoint(s) "
        f"({', '.join(newer)}) in {aside}, so that this run continues from step {step}"
    )


def remove_abandoned_temporaries(results_dir: str, name: str) -> None:
    """Remove the temporary checkpoint files that killed runs left in the run folders of `name`
    that no live job holds (each is locked while it is tidied), and log them."""
    for run in run_folders_newest_first(results_dir, name):
        lock = try_lock(run)
        if lock is None:  # held by a live job (maybe this one), or not writable
            continue
        try:
            stale = remove_stale_temporaries(os.path.join(run, "checkpoints"))
        finally:
            lock.release()
        if stale:
            logger.info(f"removed {len(stale)} temporary checkpoint file(s) left by a killed run: {', '.join(stale)}")


def seed_for_step(seed: int, step: int, rank: int) -> int:
    """A seed for the random draws of process `rank` from `step` on, a function of these alone."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1, np.uint64)[0])


def restore_rng_state(checkpoint: dict, step: int, info: DistInfo, seed: int) -> None:
    """Continue each process's random draws (timesteps, noise, label dropout, latent samples):
    exactly where they stopped on the same number of processes; on another number, where the
    checkpoint has no stream for some ranks, anew from (seed, step, rank)."""
    if checkpoint["world_size"] == info.world_size:
        states = checkpoint["rng"][info.rank]
        torch.set_rng_state(states["cpu"])
        if info.device.type == "cuda" and states["cuda"] is not None:
            torch.cuda.set_rng_state(states["cuda"], info.device)
        return
    torch.manual_seed(seed_for_step(seed, step, info.rank))
    logger.info(
        f"the checkpoint was trained by {checkpoint['world_size']} process(es), now {info.world_size}: "
        f"the data order continues as it was, random draws start anew from (--global-seed, step {step}, rank)"
    )


def restore_run(run: Run, checkpoint: dict, path: str) -> TrainState:
    """Load weights, optimizer and loss scale from a resumable checkpoint; the state to continue from."""
    run.model.load_state_dict(checkpoint["model"])
    run.ema.load_state_dict(checkpoint["ema"])
    run.optimizer.load_state_dict(checkpoint["opt"])
    for group in run.optimizer.param_groups:
        group["lr"] = run.args.lr
    if checkpoint["args"].get("lr") != run.args.lr:
        logger.info(f"--lr changed from {checkpoint['args'].get('lr')} (the checkpoint's) to {run.args.lr}: continuing with {run.args.lr}")
    if run.scaler.is_enabled() and checkpoint.get("scaler"):  # the loss scale of an fp16 run
        run.scaler.load_state_dict(checkpoint["scaler"])
    step, epoch, epoch_step = checkpoint["step"], checkpoint["epoch"], checkpoint["epoch_step"]
    logger.info(
        f"resuming from {path} at step {step} (epoch {epoch}, batch {epoch_step} of the epoch), trained with "
        f"{checkpoint['world_size']} process(es) x {checkpoint.get('grad_accum_steps', 1)} micro-batches"
    )
    return TrainState(step, epoch, epoch_step, last_checkpoint=path, checked_step=step, saved_step=step)


def training_checkpoint(run: Run, state: TrainState, rng: list[dict]) -> dict:
    """Everything a resumed run needs (the reference's four entries first)."""
    return {
        "model": run.model.state_dict(),
        "ema": run.ema.state_dict(),
        "opt": run.optimizer.state_dict(),
        "args": vars(run.args),
        "step": state.step,
        "epoch": state.epoch,
        "epoch_step": state.epoch_step,
        "world_size": run.info.world_size,
        "grad_accum_steps": run.args.grad_accum_steps,  # the split of the global batch
        "micro_batch_size": micro_batch_size(run.args, run.info.world_size),
        "dataset_size": run.dataset_size,
        "data_fingerprint": run.data_fingerprint,  # compared on resume instead of the data's path
        "rng": rng,
        "scaler": run.scaler.state_dict(),  # {} unless fp16
    }
