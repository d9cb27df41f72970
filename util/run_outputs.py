"""What a training run writes as it goes: metrics records and checkpoints. A diverged loss or a
failed write stops every process at once with one sentence."""
from __future__ import annotations

import logging
import math
import os
from typing import Callable

from util.checkpoints import save_checkpoint
from util.distributed import any_rank, rng_states_of_all_ranks
from util.files import WriteError, append_record
from util.resume import checkpoints_in, training_checkpoint
from util.run_state import Run, TrainingStopped, TrainState
from util.training import RunningStats, non_finite_parts, peak_memory_mb

logger = logging.getLogger("dit")


def stop_on_divergence(state: TrainState, what: str) -> None:
    """Stop naming what went non-finite (the loss, the weights, ...) and the steps where, without saving it."""
    first_step = state.checked_step + 1
    where = f"at step {state.step}" if first_step >= state.step else f"between steps {first_step} and {state.step}"
    message = (
        f"{what} became non-finite {where}; stopping without saving "
        f"these weights (last good checkpoint: {state.last_checkpoint or 'none'})"
    )
    logger.error(message)
    raise TrainingStopped(message)


def stop_if_a_write_failed(write: Callable[[], None], is_main: bool, path: str) -> None:
    """Rank 0 runs `write`; if the disk is full or read-only, every rank stops with its sentence
    (rather than compute on, or wait forever for rank 0)."""
    failure = None
    if is_main:
        try:
            write()
        except WriteError as error:
            logger.error(str(error))
            failure = str(error)
    if any_rank(failure is not None):
        raise TrainingStopped(failure or f"stopping: the first process could not write {path or 'its output'}")


def save_training_checkpoint(run: Run, state: TrainState, stats: RunningStats) -> None:
    """Every rank checks the loss, the weights, the EMA weights and the optimizer state and hands
    in its RNG state; rank 0 writes the file (then removes older checkpoints beyond args.keep_last)."""
    non_finite = ([] if stats.loss_sum_is_finite() else ["the loss"]) + non_finite_parts(run.model, run.ema, run.optimizer)
    if any_rank(bool(non_finite)):
        stop_on_divergence(state, " and ".join(non_finite) or "the state of another process")
    rng = rng_states_of_all_ranks(run.info.device)
    path = os.path.join(run.experiment_dir, "checkpoints", f"{state.step:07d}.pt") if run.info.is_main else ""
    stop_if_a_write_failed(lambda: save_checkpoint(training_checkpoint(run, state, rng), path), run.info.is_main, path)
    if run.info.is_main:
        logger.info(f"saved checkpoint {path}")
        state.last_checkpoint = path
        if run.args.keep_last is not None:
            remove_older_checkpoints(os.path.dirname(path), state.step, run.args.keep_last)
    state.checked_step = state.saved_step = state.step


def remove_older_checkpoints(folder: str, step: int, keep: int) -> list[str]:
    """Delete the checkpoints of `folder` before step `step` but the newest keep - 1 of them; returns their paths.

    Call it once the checkpoint of `step` is written: that one, the newest good checkpoint, is
    kept, as is any of a later step (another branch of the run's history). A file that cannot
    be deleted is named in one line and the run goes on.
    """
    older = [os.path.join(folder, name) for number, name in reversed(checkpoints_in(folder)) if number < step]
    removed = older[: max(len(older) - (keep - 1), 0)]
    for path in removed:
        try:
            os.remove(path)
        except OSError as error:
            logger.warning(f"could not remove old checkpoint {path} ({error.strerror}); the run goes on")
    if removed:
        logger.info(f"removed {len(removed)} older checkpoint(s), keeping the newest {keep}: {', '.join(removed)}")
    return removed


def log_metrics(run: Run, state: TrainState, stats: RunningStats) -> None:
    """Reduce the statistics since the last log step over the ranks; log them and append them to
    metrics.jsonl. Stops the run if the loss has become non-finite."""
    loss, steps_per_sec = stats.reduce(run.info.world_size)
    if not math.isfinite(loss):
        stop_on_divergence(state, "the loss")
    state.checked_step = state.step
    record = {
        "step": state.step,
        "loss": loss,
        "steps_per_sec": steps_per_sec,
        "images_per_sec": steps_per_sec * run.args.global_batch_size,
        "lr": run.optimizer.param_groups[0]["lr"],
        "grad_norm": stats.grad_norm.item(),
        "peak_memory_mb": peak_memory_mb(run.info.device),
        "skipped_images": stats.skipped_total,
    }
    if run.scaler.is_enabled():  # fp16: steps the loss scaler skipped for inf/NaN gradients
        record.update(skipped_steps=stats.skipped_steps_total, loss_scale=run.scaler.get_scale())
    logger.info(
        f"(step={state.step:07d}) train loss: {loss:.4f}, train steps/sec: {steps_per_sec:.2f}, "
        f"grad norm: {record['grad_norm']:.3f}, peak memory: {record['peak_memory_mb']:.0f} MB"
        + (f", unreadable images skipped so far: {stats.skipped_total}" if stats.skipped_total else "")
        + (f", fp16 steps skipped so far: {stats.skipped_steps_total}" if stats.skipped_steps_total else "")
    )
    path = os.path.join(run.experiment_dir, "metrics.jsonl") if run.info.is_main else ""
    stop_if_a_write_failed(lambda: append_record(path, record), run.info.is_main, path)
    if run.tensorboard is not None:
        for name, value in record.items():
            if name != "step":
                run.tensorboard.add_scalar(f"train/{name}", value, state.step)
