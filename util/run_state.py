"""What a training run holds: the fixed parts (Run) and where it stands (TrainState)."""
from __future__ import annotations

import argparse
from copy import deepcopy
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from models import DiT, DiT_models
from util.distributed import DistInfo
from util.precision import grad_scaler
from util.training import build_optimizer

if TYPE_CHECKING:  # an optional dependency, imported only when TensorBoard events are written
    from torch.utils.tensorboard import SummaryWriter


class TrainingStopped(SystemExit):
    """Every process stops with one sentence: the loss diverged or a write failed."""


@dataclass
class TrainState:
    """Where training stands. A checkpoint records step, epoch and epoch_step."""

    step: int = 0
    epoch: int = 0
    epoch_step: int = 0  # optimizer steps of `epoch` already taken
    last_checkpoint: str | None = None  # the newest checkpoint written or resumed from
    checked_step: int = 0  # losses and weights up to this step are known to be finite
    saved_step: int | None = None  # the step of the newest checkpoint of this run

    def advance(self, steps_per_epoch: int) -> None:
        self.step += 1
        self.epoch_step += 1
        if self.epoch_step == steps_per_epoch:  # the last partial global batch is dropped
            self.epoch, self.epoch_step = self.epoch + 1, 0


@dataclass
class Run:
    """What stays the same over a run: the settings, the processes, the folder and what is trained."""

    args: argparse.Namespace
    info: DistInfo
    dataset_size: int
    model: DiT
    ema: DiT
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    experiment_dir: str | None = None  # rank 0's; made once the settings and weights are checked
    tensorboard: SummaryWriter | None = None  # rank 0's, when TensorBoard events are asked for
    data_fingerprint: str | None = None  # the dataset's fingerprint(), recorded in every checkpoint


def micro_batch_size(args: argparse.Namespace, world_size: int) -> int:
    """Images per process per backward pass: global batch = micro-batch x accumulation steps x processes."""
    return args.global_batch_size // (world_size * args.grad_accum_steps)


def build_run(args: argparse.Namespace, info: DistInfo, dataset_size: int, in_channels: int, input_size: int) -> Run:
    """A fresh model for in_channels x input_size x input_size inputs, its EMA copy (the reference
    initialises both alike), optimizer and loss scaler."""
    model = DiT_models[args.model](
        input_size=input_size,
        in_channels=in_channels,
        num_classes=args.num_classes,
        class_dropout_prob=args.class_dropout_prob,
        fused_attn=args.attention == "fused",
    ).to(info.device)
    ema = deepcopy(model).requires_grad_(False)
    optimizer = build_optimizer(model, args.lr)
    return Run(args, info, dataset_size, model, ema, optimizer, grad_scaler(args.precision, info.device))
