"""Encode an image folder once with the VAE, for training with `train.py --feature-path`.

For every image the store keeps the autoencoder posterior's mean and std of the image and of
its mirror image (of the image alone with --no-flip), so training can still draw the flip and
the latent sample afresh at each step (`latent = (mean + std * eps - shift) * scale`, with the
autoencoder's numbers that meta.json records): the same distribution as encoding on the fly.
Any diffusers AutoencoderKL folder works (--vae-path); the arrays take its channels and size.

  torchrun --nproc_per_node=8 extract_features.py --data-path /data/imagenet/train --feature-path features/in256
  python extract_features.py --data-path DIR --feature-path DIR            (one GPU, or the CPU)

Each process encodes its share of the images not yet done; rank 0 writes them into the
memory-mapped arrays. Rerun the same command after an interruption to continue; a rerun also
recreates any array whose file does not match meta.json (cut short, missing) and encodes its
images again. A complete store gets the SHA-256 of its arrays in meta.json ("checksum"): the
identity train.py's resume compares, so a copy of the store resumes where the original would.
"""
from __future__ import annotations

import argparse
import errno
import logging
import os
import shutil
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from util.flags import add_data_flags, add_vae_flags, autoencoder_from_flags, make_parser, vae_error_sentence
from util.data import (
    FEATURE_DTYPES,
    FEATURE_FORMAT,
    ImageDataset,
    create_feature_array,
    create_feature_store,
    feature_autoencoder,
    feature_bytes_per_image,
    feature_store_checksum,
    feature_store_problems,
    feature_views,
    open_feature_arrays,
    read_feature_meta,
    vae_encoder_fingerprint,
    write_feature_meta,
)
from util.files import nearest_existing, output_folder_problem, write_error_message
from util.distributed import any_rank, barrier, cleanup_distributed, create_logger, gather_from_all, setup_distributed
from util.vae import HUB_VAES, PIXEL_SPACE, SD_LATENT_CHANNELS, Autoencoder, AutoencoderError, load_autoencoder

# Settings that must agree between a feature folder and the run that continues it.
MATCHING_META_KEYS = ("image_size", "dtype", "count", "classes", "vae_encoder", "flip", "latent_space")
FEATURE_FILES = ("mean.npy", "std.npy", "labels.npy", "done.npy")
FLUSH_EVERY_BATCHES = 50
LOG_EVERY_BATCHES = 20

logger = logging.getLogger("dit")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = make_parser("Pre-extract VAE posteriors of an ImageFolder for train.py --feature-path.")
    add_data_flags(parser, required=True)
    parser.add_argument("--feature-path", type=str, required=True, help="output folder (created, or continued)")
    parser.add_argument("--image-size", type=int, default=256, help="center-crop size in pixels, a multiple of the VAE's down-sampling (8 for the SD VAEs)")
    add_vae_flags(parser, default="ema")
    parser.add_argument(
        "--no-flip", action="store_true",
        help="store each image only, not also its mirror (half the disk); training then never flips",
    )
    parser.add_argument("--batch-size", type=int, default=32, help="images per process per batch")
    parser.add_argument("--dtype", type=str, choices=FEATURE_DTYPES, default="float16", help="storage type of mean and std")
    return parser.parse_args(argv)


class ExtractionItems(Dataset):
    """(index, image, label) for the given dataset indices; an unreadable image gets label -1."""

    def __init__(self, images: ImageDataset, indices: list[int]):
        self.images = images
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[int, torch.Tensor, int]:
        index = self.indices[position]
        pixels = self.images.load(index)
        if pixels is None:
            return index, torch.zeros(3, self.images.image_size, self.images.image_size), -1
        return index, pixels, self.images.samples[index][1]


@torch.no_grad()
def encode_posterior(vae: torch.nn.Module, images: torch.Tensor, flip: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of each image and its mirror (of the image alone unless flip):
    two (N, views, C, L, L) tensors."""
    views = [images, images.flip(-1)] if flip else [images]
    posterior = vae.encode(torch.cat(views)).latent_dist
    return torch.stack(posterior.mean.chunk(len(views)), dim=1), torch.stack(posterior.std.chunk(len(views)), dim=1)


def shard_of_pending(done: np.ndarray, rank: int, world_size: int, batch_size: int) -> list[int]:
    """This rank's share of the indices not done yet, padded (by repeating the last one) so
    that every rank runs the same number of full batches."""
    pending = np.flatnonzero(~done).tolist()
    if not pending:
        return []
    chunk = world_size * batch_size
    pending += pending[-1:] * (-len(pending) % chunk)
    return pending[rank::world_size]


def store_settings(meta: dict) -> dict:
    """The settings of MATCHING_META_KEYS, with the defaults of stores that do not record them;
    the latent space without the VAE's name (the hub's ema and mse VAEs share an encoder)."""
    latent_space = {key: value for key, value in feature_autoencoder(meta).items() if key != "vae"}
    return {**meta, "flip": feature_views(meta) == 2, "latent_space": latent_space}


def check_existing_store(path: str, meta: dict) -> bool:
    """True when `path` already holds a store for these settings; exits when it holds another."""
    try:
        existing = store_settings(read_feature_meta(path))
    except ValueError:
        return False
    now = store_settings(meta)
    differences = [f"{key} {existing.get(key)!r} (now {now[key]!r})" for key in MATCHING_META_KEYS if existing.get(key) != now[key]]
    if differences:
        raise SystemExit(
            f"{path} holds features made with other settings: "
            + ", ".join(d if len(d) < 120 else d[:117] + "..." for d in differences)
            + "; pass another --feature-path or the same settings to continue it"
        )
    return True


def bytes_to_allocate(path: str, count: int, latent: int, dtype: str, channels: int = SD_LATENT_CHANNELS, views: int = 2) -> int:
    """Disk space the store at `path` still has to take: all of it for a new store, the blocks
    not yet allocated for an existing one (stores made before preallocation are sparse files)."""
    files = [os.path.join(path, name) for name in FEATURE_FILES]
    if not all(os.path.isfile(file) for file in files):
        return count * feature_bytes_per_image(latent, dtype, channels, views)
    return sum(max(0, os.stat(file).st_size - 512 * os.stat(file).st_blocks) for file in files)


def check_free_space(path: str, needed: int) -> None:
    """Exit with one sentence, before any work, when the disk that holds `path` lacks `needed` bytes."""
    free = shutil.disk_usage(nearest_existing(path)).free
    if free < needed:
        raise SystemExit(
            f"not enough disk space for the features in {path}: they need {needed:,} bytes "
            f"({needed / 2**30:.2f} GiB) and {free:,} are free; free some space or pass another --feature-path"
        )


def preallocate(path: str) -> str | None:
    """Reserve the disk blocks of the store's arrays; a sentence if that fails, else None.

    Writing into a memory-mapped file on a full disk kills the process with SIGBUS ("Bus
    error") halfway through; with the blocks reserved up front, a full disk fails here instead.
    """
    needed = sum(max(0, os.stat(os.path.join(path, name)).st_size) for name in FEATURE_FILES)
    for name in FEATURE_FILES:
        file = os.path.join(path, name)
        try:
            with open(file, "r+b") as f:
                os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except OSError as error:
            if error.errno in (errno.EOPNOTSUPP, errno.EINVAL):  # no fallocate here: the free-space check must do
                continue
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                return f"not enough disk space for the features in {path}: they need {needed:,} bytes ({needed / 2**30:.2f} GiB); free some space or pass another --feature-path"
            return write_error_message(error, file, "reserve disk space for") or f"cannot reserve disk space for {file} ({error})"
    return None


def redo_damaged_arrays(path: str) -> str | None:
    """Recreate the arrays of the store at `path` that do not match its meta.json and clear every
    done flag (the rows of a damaged array are lost, and a damaged done.npy says nothing), so the
    run encodes every image again; a line saying so, or None when no array is damaged."""
    meta = read_feature_meta(path)
    problems = feature_store_problems(path, meta)
    if not problems:
        return None
    meta.pop("checksum", None)  # the store is not complete any more
    write_feature_meta(path, meta)
    for name in problems:
        create_feature_array(path, name, meta)
    done = np.load(os.path.join(path, "done.npy"), mmap_mode="r+")  # its size is checked (or it was just made)
    done[:] = False
    done.flush()
    recreated = ", ".join(f"{name}.npy" for name in problems)
    return (
        f"the feature folder {path} was damaged ({'; '.join(problems.values())}): recreated {recreated} "
        f"and cleared the done flags, so all {meta['count']} images are encoded again"
    )


def prepare_store(path: str, meta: dict, exists: bool) -> str | None:
    """Create the store (unless it exists; then redo its damaged arrays) and reserve its disk
    space; a sentence on failure."""
    try:
        if not exists:
            create_feature_store(path, meta)
        elif note := redo_damaged_arrays(path):
            logger.warning(note)
    except OSError as error:
        return write_error_message(error, path, "create the feature folder") or f"cannot create the feature folder {path} ({error})"
    return preallocate(path)


def read_latent_space(args: argparse.Namespace) -> tuple[Autoencoder, int]:
    """The autoencoder's numbers (from its config, no weights) and the latent side; one sentence
    for pixel space, a VAE that cannot be found, or an image size it cannot encode."""
    if args.vae == PIXEL_SPACE and args.vae_path is None:
        raise SystemExit(
            f"--vae {PIXEL_SPACE} trains on pixels, which need no features: train from the image folder (train.py --data-path)"
        )
    try:
        return autoencoder_from_flags(args)
    except ValueError as error:
        raise SystemExit(str(error)) from None


def validate_args(args: argparse.Namespace) -> None:
    """Exit with one sentence on settings that cannot work, before any work starts."""
    read_latent_space(args)
    if args.batch_size < 1:
        raise SystemExit(f"--batch-size must be at least 1, not {args.batch_size}")
    if args.num_workers < 0:
        raise SystemExit(f"--num-workers must be 0 or more, not {args.num_workers}")
    problem = output_folder_problem(args.feature_path, "--feature-path")
    if problem:
        raise SystemExit(problem)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    validate_args(args)
    info = setup_distributed()
    try:
        extract(args, info)
    finally:
        cleanup_distributed()


def extract(args: argparse.Namespace, info) -> None:
    create_logger(None, info.rank)
    try:
        images = ImageDataset(args.data_path, args.image_size)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    described, latent = read_latent_space(args)
    views = 1 if args.no_flip else 2
    needed = bytes_to_allocate(args.feature_path, len(images), latent, args.dtype, described.channels, views)
    check_free_space(args.feature_path, needed)
    try:
        autoencoder = load_autoencoder(args.vae, info.device, args.vae_path)
    except AutoencoderError as error:
        raise SystemExit(vae_error_sentence(error, args.vae_path)) from None
    vae = autoencoder.module
    meta = {
        "format": FEATURE_FORMAT,
        "image_size": args.image_size,
        "latent_size": latent,
        "count": len(images),
        "classes": images.classes,
        "dtype": args.dtype,
        "vae": args.vae_path or HUB_VAES[args.vae],
        "vae_encoder": vae_encoder_fingerprint(vae),
        "autoencoder": autoencoder.describe(),
        "flip": not args.no_flip,
        "data_path": args.data_path,
    }
    exists = check_existing_store(args.feature_path, meta)
    failure = prepare_store(args.feature_path, meta, exists) if info.is_main else None
    if any_rank(failure is not None):  # also the barrier: the store exists from here on
        raise SystemExit(failure or "stopping: the first process could not prepare the feature folder")

    arrays = open_feature_arrays(args.feature_path, writable=info.is_main)
    shard = shard_of_pending(np.array(arrays["done"]), info.rank, info.world_size, args.batch_size)
    todo = int(np.count_nonzero(~np.array(arrays["done"])))
    logger.info(
        f"{len(images)} images in {args.data_path}, {todo} to encode into {args.feature_path} "
        f"({feature_bytes_per_image(latent, args.dtype, autoencoder.channels, views) / 1024:.1f} KiB per image)"
    )
    if not shard:
        logger.info("nothing left to do: the feature folder is complete")
        if info.is_main and "checksum" not in read_feature_meta(args.feature_path):  # a store made without one
            record_checksum(args.feature_path)
        return
    if info.is_main:
        forget_checksum(args.feature_path)  # the arrays change: a crash must not leave the old checksum
    loader = DataLoader(
        ExtractionItems(images, shard),
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        pin_memory=info.device.type == "cuda",
    )
    written: list[np.ndarray] = []
    start = time.time()
    for batch_index, (indices, pixels, labels) in enumerate(loader, start=1):
        mean, std = encode_posterior(vae, pixels.to(info.device), flip=not args.no_flip)
        indices, labels = indices.to(info.device), labels.to(info.device)
        indices, labels, mean, std = (gather_from_all(t) for t in (indices, labels, mean, std))
        if info.is_main:
            rows = indices.cpu().numpy()
            arrays["mean"][rows] = mean.cpu().numpy().astype(args.dtype)
            arrays["std"][rows] = std.cpu().numpy().astype(args.dtype)
            arrays["labels"][rows] = labels.cpu().numpy()
            written.append(rows)
        if batch_index % FLUSH_EVERY_BATCHES == 0 or batch_index == len(loader):
            mark_done(arrays, written)
            written = []
        if batch_index % LOG_EVERY_BATCHES == 0 or batch_index == len(loader):
            encoded = min(batch_index * args.batch_size * info.world_size, todo)
            logger.info(f"encoded {encoded}/{todo} images ({encoded / (time.time() - start):.1f} images/s)")
    if info.is_main:
        unreadable = int(np.count_nonzero(np.array(arrays["labels"]) < 0))
        if unreadable:
            logger.info(f"{unreadable} unreadable images are marked with label -1 and skipped in training")
        record_checksum(args.feature_path)
    barrier()
    logger.info(f"done: {args.feature_path} holds {len(images)} images")


def forget_checksum(path: str) -> None:
    meta = read_feature_meta(path)
    if meta.pop("checksum", None) is not None:
        write_feature_meta(path, meta)


def record_checksum(path: str) -> None:
    """Write the checksum of the complete store's arrays into its meta.json."""
    meta = read_feature_meta(path)
    meta["checksum"] = feature_store_checksum(path)
    write_feature_meta(path, meta)
    logger.info(f"{path} is complete: checksum {meta['checksum']}")


def mark_done(arrays: dict[str, np.ndarray], written: list[np.ndarray]) -> None:
    """Flush the written rows to disk first, then mark them done, so a crash never marks unwritten rows."""
    if not written:
        return
    for name in ("mean", "std", "labels"):
        arrays[name].flush()
    arrays["done"][np.concatenate(written)] = True
    arrays["done"].flush()


if __name__ == "__main__":
    main()
