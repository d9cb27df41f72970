"""Sample an image set for FID in parallel: one PNG per image, then one .npz for ADM's evaluator.

  torchrun --nnodes=1 --nproc_per_node=8 sample_ddp.py --model DiT-XL/2 --num-fid-samples 50000
  python sample_ddp.py --ckpt CKPT --num-fid-samples 100   # one process; a train.py checkpoint names its model, size, VAE
  torchrun --nproc_per_node=8 sample_ddp.py --sampler dpm-solver++ --num-sampling-steps 25  # 10x fewer calls

Image i's starting latent, its label and its noise at every step (samplers that draw noise:
ddpm, dpm-solver++-sde) come from numpy's generator seeded with [global_seed, i] alone. The model always runs on a fixed block of
--micro-batch-size images, and image i always sits at row i % micro-batch-size of block
i // micro-batch-size (rows without an image to make are padding), so float rounding, which
depends on the batch shape and on kernels' tiling, is the same for image i in every run:
each image is bit-identical whatever the number of processes and --per-proc-batch-size
(on the same hardware and software; on CPUs the thread count counts too). A run that is
stopped can be started again with the same flags: the valid PNGs are kept and only the
others are sampled.
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import zipfile
from typing import Callable, Iterable

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from util.checkpoints import content_digest
from util.distributed import DistInfo, all_gather_objects, barrier, cleanup_distributed, setup_distributed
from util.images import to_uint8
from util.files import WriteError, atomic_open, one_sentence_write_errors, output_folder_problem
from util.flags import (
    CHECKPOINT_FLAGS,
    add_compile_flag,
    add_model_flags,
    add_precision_flag,
    add_sampling_flags,
    add_vae_flags,
    check_sampling_flags,
    given_flags,
    guidance_note,
    load_model,
    make_parser,
    sampler_from_flags,
)
from models import DiT
from util.precision import setup_precision
from util.sampling import SETUP_ERRORS, Sampler, compile_for_sampling, denoise, guidance_scale
from util.vae import Autoencoder

SETTINGS_FILE = "sampling_settings.json"
# The settings' entry that names the weights by content (util.checkpoints.content_digest of the
# model's state dict), so that other weights behind the same --ckpt path are told apart.
FINGERPRINT = "weights_fingerprint"
# The flags that decide the pixels: a folder's PNGs are only reused when all of them agree.
RECIPE = (
    "model", "ckpt", "image_size", "num_classes", "vae", "vae_path", "cfg_scale", "cfg_all_eps_channels",
    "num_sampling_steps", "sampler", "timestep_spacing", "precision", "compile", "global_seed", "micro_batch_size", "weights",
)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, set[str]]:
    """The flags, and which of CHECKPOINT_FLAGS the command line gave."""
    parser = make_parser("Sample a set of images for FID from a DiT, over any number of processes.")
    add_model_flags(parser)
    add_vae_flags(parser, default="ema")
    add_sampling_flags(parser, cfg_scale=1.5)
    parser.add_argument("--sample-dir", type=str, default="samples", help="the PNG folder and the .npz go here, named after the settings")
    parser.add_argument(
        "--per-proc-batch-size", type=int, default=32,
        help="images a process takes on at a time, in whole blocks of --micro-batch-size; changes no pixel",
    )
    parser.add_argument(
        "--micro-batch-size", type=int, default=32,
        help="images per model call; part of the recipe (float rounding depends on it); raise it for throughput",
    )
    parser.add_argument("--num-fid-samples", type=int, default=50_000, help="images in the set (the .npz holds exactly this many)")
    parser.add_argument("--global-seed", type=int, default=0, help="image i's latent, label and noise come from (seed, i) alone")
    parser.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True, help="shorthand for --precision tf32 / fp32")
    add_precision_flag(parser, default=None)
    add_compile_flag(parser)
    args = parser.parse_args(argv)
    if args.precision is None:  # the original's --tf32 decides
        args.precision = "tf32" if args.tf32 else "fp32"
    return args, given_flags(parser, argv, CHECKPOINT_FLAGS)


def check_args(args: argparse.Namespace) -> None:
    check_sampling_flags(args)
    for flag in ("per_proc_batch_size", "micro_batch_size", "num_fid_samples"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.global_seed < 0:
        raise ValueError(f"--global-seed must be non-negative, got {args.global_seed}")
    problem = output_folder_problem(args.sample_dir, "--sample-dir")
    if problem:
        raise ValueError(problem)


def sample_folder(args: argparse.Namespace) -> str:
    """The original's folder name: model, checkpoint (and -raw for its raw weights), size, VAE,
    guidance scale and seed."""
    model_name = args.model.replace("/", "-")
    ckpt_name = os.path.basename(os.path.normpath(args.ckpt)).replace(".pt", "") if args.ckpt else "pretrained"
    ckpt_name += "-raw" if args.weights == "raw" else ""
    vae_name = os.path.basename(os.path.normpath(args.vae_path)) if args.vae_path else args.vae
    return os.path.join(
        args.sample_dir,
        f"{model_name}-{ckpt_name}-size-{args.image_size}-vae-{vae_name}-cfg-{args.cfg_scale}-seed-{args.global_seed}",
    )


def recipe(args: argparse.Namespace) -> dict:
    settings = {key: getattr(args, key) for key in RECIPE}
    if args.sampler in ("ddpm", "ddim"):  # they ignore the spacing; folders from before the flag stay valid
        settings["timestep_spacing"] = None
    if args.weights == "ema":  # folders from before --weights stay valid
        settings["weights"] = None
    for key in ("ckpt", "vae_path"):
        if settings[key] is not None and not settings[key].startswith("hf:"):
            settings[key] = os.path.abspath(settings[key])
    return settings


def check_settings(folder: str, args: argparse.Namespace, fingerprint: str, is_main: bool) -> None:
    """Refuse to add to a folder sampled with other settings or other weights; record both in a
    new one. The weights are compared by content, so the same weights at another path are
    accepted; folders that record no fingerprint compare the checkpoint's path instead."""
    path = os.path.join(folder, SETTINGS_FILE)
    wanted = recipe(args)
    if os.path.isfile(path):
        with open(path) as f:
            found = json.load(f)
        compared = [key for key in RECIPE if key != "ckpt" or FINGERPRINT not in found]
        differ = [f"{key} {found.get(key)!r} there, {wanted[key]!r} now" for key in compared if found.get(key) != wanted[key]]
        other = "settings" if differ else "weights"
        if found.get(FINGERPRINT, fingerprint) != fingerprint:
            differ.append(f"weights of content {found[FINGERPRINT]} there, {fingerprint} now in {args.ckpt}")
        if differ:
            raise ValueError(f"{folder} holds samples made with other {other} ({'; '.join(differ)}); pass another --sample-dir or remove the folder")
    elif is_main:  # written whole, so that the other processes never read half a file
        with one_sentence_write_errors(path, "write"), atomic_open(path) as f:
            json.dump({**wanted, FINGERPRINT: fingerprint}, f, indent=2)


def png_path(folder: str, index: int) -> str:
    return os.path.join(folder, f"{index:06d}.png")


def is_valid_png(path: str, image_size: int) -> bool:
    """A complete RGB image of the right size (a truncated file fails to decode)."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.format == "PNG" and image.mode == "RGB" and image.size == (image_size, image_size)
    except (OSError, SyntaxError, ValueError, struct.error):
        return False


def missing_indices(folder: str, num_samples: int, image_size: int, rank: int, world_size: int) -> list[int]:
    """Indices without a valid PNG; each process checks a share of the files, all get the whole list."""
    mine = [i for i in range(rank, num_samples, world_size) if not is_valid_png(png_path(folder, i), image_size)]
    return sorted(i for share in all_gather_objects(mine) for i in share)


def image_generators(global_seed: int, indices: Iterable[int]) -> list[np.random.Generator]:
    """One generator per image, seeded by (global_seed, index) alone."""
    return [np.random.default_rng([global_seed, index]) for index in indices]


def per_image_noise(
    generators: list[np.random.Generator], positions: list[int], rows: int
) -> Callable[[torch.Tensor], torch.Tensor]:
    """noise_fn for the sampling loop: each image's row gets noise from its own generator,
    padding rows get zeros, and a guided batch repeats it for its unconditional half."""

    def noise_fn(x: torch.Tensor) -> torch.Tensor:
        noise = torch.zeros(rows, *x.shape[1:])
        for row, generator in zip(positions, generators):
            noise[row] = torch.from_numpy(generator.standard_normal(tuple(x.shape[1:]), dtype=np.float32))
        return noise.repeat(len(x) // rows, 1, 1, 1).to(x.device)

    return noise_fn


def deal_blocks(missing: list[int], block_size: int, per_turn: int, rank: int, world_size: int) -> list[list[int]]:
    """This process's share of the work: the missing indices grouped by block, the blocks
    dealt out to the processes `per_turn` at a time."""
    blocks: dict[int, list[int]] = {}
    for index in missing:
        blocks.setdefault(index // block_size, []).append(index)
    ordered = [blocks[key] for key in sorted(blocks)]
    turns = [ordered[start : start + per_turn] for start in range(0, len(ordered), per_turn)]
    return [block for turn in turns[rank::world_size] for block in turn]


def draw_start(generator: np.random.Generator, latent_shape: tuple[int, ...], num_classes: int) -> tuple[np.ndarray, int]:
    """An image's first draws from its generator: its starting latent, then its label (its noise
    at every step follows)."""
    z = generator.standard_normal(latent_shape, dtype=np.float32)
    return z, int(generator.integers(num_classes))


def image_labels(global_seed: int, num_samples: int, latent_shape: tuple[int, ...], num_classes: int) -> np.ndarray:
    """The (num_samples,) labels of the set, drawn again from each image's generator: the same
    labels whichever run sampled which image."""
    return np.array([draw_start(g, latent_shape, num_classes)[1] for g in image_generators(global_seed, range(num_samples))], dtype=np.int64)


def sample_block(
    model: DiT, sampler: Sampler, autoencoder: Autoencoder, indices: list[int], args: argparse.Namespace, device: torch.device,
) -> np.ndarray:
    """(len(indices), H, W, 3) uint8 images for indices of one block, each sampled at its own row."""
    rows, size = args.micro_batch_size, model.input_size
    positions = [index % rows for index in indices]
    generators = image_generators(args.global_seed, indices)
    z = np.zeros((rows, model.in_channels, size, size), dtype=np.float32)
    y = np.zeros(rows, dtype=np.int64)
    for row, generator in zip(positions, generators):
        z[row], y[row] = draw_start(generator, z.shape[1:], args.num_classes)
    latents = denoise(
        model, sampler, torch.from_numpy(z).to(device), torch.from_numpy(y).to(device),
        args.cfg_scale if args.cfg_scale > 1.0 else None, precision=args.precision,
        all_eps_channels=args.cfg_all_eps_channels, noise_fn=per_image_noise(generators, positions, rows),
    )
    return to_uint8(autoencoder.decode(latents))[positions]  # pixel space: the model's output itself


def save_png(pixels: np.ndarray, path: str) -> None:
    """Write through a temporary file so that a killed run leaves no half-written PNG."""
    with one_sentence_write_errors(path, "write"), atomic_open(path, "wb") as f:
        Image.fromarray(pixels).save(f, format="PNG")


def npz_entry(name: str) -> zipfile.ZipInfo:
    # A fixed timestamp makes equal sample sets give byte-identical files.
    return zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))


def write_npz(folder: str, num_samples: int, image_size: int, labels: np.ndarray) -> str:
    """<folder>.npz in np.savez's layout: arr_0 (N, H, W, 3) uint8, streamed one PNG at a time
    (a 50K set is ~10 GB at 256 px), and arr_1 (N,) int64, each image's class label, as in
    ADM's labelled reference batches."""
    path = f"{folder}.npz"
    header = {"descr": "|u1", "fortran_order": False, "shape": (num_samples, image_size, image_size, 3)}
    with one_sentence_write_errors(path, "write"), atomic_open(path, "wb") as file, zipfile.ZipFile(file, "w") as archive:
        with archive.open(npz_entry("arr_0.npy"), "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, header)
            for index in tqdm(range(num_samples), desc="writing .npz", unit="img"):
                with Image.open(png_path(folder, index)) as image:
                    f.write(np.asarray(image.convert("RGB"), dtype=np.uint8).tobytes())
        with archive.open(npz_entry("arr_1.npy"), "w", force_zip64=True) as f:
            np.lib.format.write_array(f, labels.astype(np.int64), allow_pickle=False)
    return path


def write_samples(model: DiT, sampler: Sampler, autoencoder: Autoencoder, folder: str, args: argparse.Namespace, info: DistInfo) -> None:
    """The missing PNGs of the folder, shared out over the processes; then rank 0 writes the .npz."""
    missing = missing_indices(folder, args.num_fid_samples, args.image_size, info.rank, info.world_size)
    per_turn = -(-args.per_proc_batch_size // args.micro_batch_size)
    my_blocks = deal_blocks(missing, args.micro_batch_size, per_turn, info.rank, info.world_size)
    if info.is_main:
        print(f"{folder}: {args.num_fid_samples - len(missing)} of {args.num_fid_samples} images present, sampling {len(missing)}")
    bar = tqdm(total=len(missing), unit="img", disable=not info.is_main)
    for indices in my_blocks:
        for index, pixels in zip(indices, sample_block(model, sampler, autoencoder, indices, args, info.device)):
            save_png(pixels, png_path(folder, index))
        # Rank 0 counts the other processes' images as equal to its own.
        bar.update(min(len(indices) * info.world_size, bar.total - bar.n))
    bar.close()

    barrier()
    if info.is_main:
        latent_shape = (model.in_channels, model.input_size, model.input_size)
        labels = image_labels(args.global_seed, args.num_fid_samples, latent_shape, args.num_classes)
        path = write_npz(folder, args.num_fid_samples, args.image_size, labels)
        print(f"saved {path} with arr_0 of shape ({args.num_fid_samples}, {args.image_size}, {args.image_size}, 3) and its labels as arr_1")


def main(argv: list[str] | None = None) -> None:
    args, given = parse_args(argv)
    info = setup_distributed()
    try:
        check_args(args)
        # The concrete precision, not `auto`, goes into the recipe: it decides the pixels.
        args.precision, message = setup_precision(args.precision, info.device)
        if message and info.is_main:
            print(message, file=sys.stderr)
        sampler = sampler_from_flags(args)
        model, autoencoder = load_model(args, given, info.device)
        # The scale in effect goes into the recipe and the folder name: the pixels follow it.
        message = guidance_note(model, args.cfg_scale)
        if message and info.is_main:
            print(message, file=sys.stderr)
        args.cfg_scale = guidance_scale(model, args.cfg_scale)
        fingerprint = content_digest(model.state_dict())
        if args.compile:
            compile_for_sampling(model)
        folder = sample_folder(args)
        with one_sentence_write_errors(folder, "create the folder"):
            os.makedirs(folder, exist_ok=True)
        check_settings(folder, args, fingerprint, info.is_main)
    except SETUP_ERRORS as error:
        cleanup_distributed()
        sys.exit(f"sample_ddp.py: error: {error}")
    try:
        write_samples(model, sampler, autoencoder, folder, args, info)
    except WriteError as error:  # a full or read-only disk: one sentence naming the file
        cleanup_distributed()
        sys.exit(f"sample_ddp.py: error: {error}")
    cleanup_distributed()


if __name__ == "__main__":
    main()
