"""This process's loader over the shuffled epochs, and its batches as latents on the device."""
from __future__ import annotations

import argparse
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from util.data import EpochSampler
from util.distributed import DistInfo
from util.run_state import micro_batch_size
from util.stop_signals import ignore_stop_signals
from util.training import RunningStats, latents_from_features, latents_from_images
from util.vae import Autoencoder


def make_loader(dataset: Dataset, args: argparse.Namespace, info: DistInfo) -> tuple[EpochSampler, DataLoader]:
    """This rank's loader over the shuffled epochs (see EpochSampler), in micro-batches."""
    sampler = EpochSampler(len(dataset), info.rank, info.world_size, args.global_seed)
    loader = DataLoader(
        dataset,
        batch_size=micro_batch_size(args, info.world_size),
        sampler=sampler,
        num_workers=args.num_workers,
        pin_memory=info.device.type == "cuda",
        drop_last=True,
        persistent_workers=args.num_workers > 0,
        worker_init_fn=ignore_stop_signals,  # the training process stops them at a step boundary
        # A private generator: making loader iterators must not consume the global RNG.
        generator=torch.Generator().manual_seed(args.global_seed),
    )
    return sampler, loader


def batch_to_device(batch: list, autoencoder: Autoencoder | None, using_features: bool, device: torch.device):
    """A loader batch -> (latents, labels, number of unreadable images replaced)."""
    if using_features:
        mean, std, labels, skipped = batch
        latents = latents_from_features(mean.to(device, non_blocking=True), std.to(device, non_blocking=True), autoencoder)
    else:
        images, labels, skipped = batch
        latents = latents_from_images(autoencoder, images.to(device, non_blocking=True))
    return latents, labels.to(device, non_blocking=True), skipped


def next_micro_batches(
    batches: Iterator, count: int, autoencoder: Autoencoder, using_features: bool, device: torch.device, stats: RunningStats
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The next `count` loader batches as (latents, labels) on the device, made one at a time when
    asked for (so one micro-batch's images are in memory at once); counts the unreadable images."""
    for _ in range(count):
        latents, labels, skipped = batch_to_device(next(batches), autoencoder, using_features, device)
        stats.add_skipped(skipped)
        yield latents, labels
