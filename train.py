"""Train a DiT on latents of an image folder (or of pre-extracted features).

  torchrun --nnodes=1 --nproc_per_node=8 train.py --model DiT-XL/2 --data-path /data/imagenet/train
  python train.py --model DiT-S/8 --data-path DIR          (one process, on a GPU or the CPU)

Each run writes results/NNN-<model>/ with log.txt, metrics.jsonl, checkpoints/ and
(with --sample-every) samples/. `--resume auto` continues the newest run of the model, on
any number of processes and any --grad-accum-steps that keep the global batch;
`--init-from CKPT` fine-tunes from other weights. train() reads top-down: set-up, then the
loop. SIGTERM or SIGUSR1 (preemption, a time limit) saves a checkpoint after the
current step and exits. The building blocks (optimizer, EMA update, one training step) are importable.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import math
import os
import resource
import signal
import time
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from copy import deepcopy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset
from torchvision.utils import make_grid

from util.files import WriteError, append_record, create_run_dir, output_folder_problem, trim_metrics
from util.checkpoints import (
    checkpoints_newest_first,
    load_checkpoint,
    load_newest_good_checkpoint,
    missing_entries,
    model_weights,
    remove_stale_temporaries,
    save_checkpoint,
    setting_differences,
)
from util.flags import add_compile_flag, add_data_flags, add_model_flags, add_precision_flag, add_vae_flags, make_parser
from util.data import EpochSampler, FeatureDataset, ImageDataset, vae_encoder_fingerprint
from diffusion import SpacedDiffusion, create_diffusion
from util.distributed import (
    DistInfo,
    all_reduce_mean,
    any_rank,
    cleanup_distributed,
    create_logger,
    max_over_ranks,
    rng_states_of_all_ranks,
    setup_distributed,
)
from util.images import save_grid
from util.pretrained import PRETRAINED_MODELS, download_model
from models import DiT, DiT_models, check_state_dict
from util.precision import autocast, grad_scaler, setup_precision
from util.stop_signals import StopRequest, exit_code, ignore_stop_signals
from util.sampling import LABEL_TABLE, create_sampler, denoise
from util.vae import HUB_VAES, LATENT_SCALE, decode, encode, latent_size, load_vae

if TYPE_CHECKING:  # an optional dependency, imported with --tensorboard only
    from torch.utils.tensorboard import SummaryWriter

# Periodic sample grids: a few EMA samples with classifier-free guidance.
SAMPLE_COUNT = 8
SAMPLE_CFG_SCALE = 4.0
# Checkpoint entries a resumable checkpoint must hold (the reference's four come first).
RESUME_KEYS = ("model", "ema", "opt", "args", "step", "epoch", "epoch_step", "world_size", "dataset_size", "rng")
# Settings a resumed run must share with its checkpoint.
RESUME_MATCHING_ARGS = ("model", "image_size", "num_classes", "global_batch_size", "global_seed", "ema_decay")
# The diffusion's T (paper Section 2): sample grids take 1 to T steps.
DIFFUSION_STEPS = 1000

logger = logging.getLogger("dit")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = make_parser("Train a class-conditional DiT.")
    add_data_flags(parser, required=False)
    parser.add_argument("--feature-path", type=str, default=None, help="train from extract_features.py output instead of images")
    parser.add_argument("--results-dir", type=str, default="results", help="each run gets a new folder NNN-<model> here")
    add_model_flags(parser)
    parser.add_argument(
        "--class-dropout-prob", type=float, default=0.1,
        help="labels replaced by the null label in training, for classifier-free guidance (paper Section 3.1); "
        "0 gives no null label (with --num-classes 1: unconditional training)",
    )
    parser.add_argument("--epochs", type=int, default=1400, help="passes over the data (the run also stops at --max-steps)")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps in total")
    parser.add_argument("--global-batch-size", type=int, default=256, help="images per optimizer step over all processes (paper: 256)")
    parser.add_argument(
        "--grad-accum-steps", type=int, default=1,
        help="split each process's share of a global batch into this many micro-batches (one backward pass each)",
    )
    parser.add_argument("--global-seed", type=int, default=0, help="seeds the data order and every random draw")
    add_vae_flags(parser, default="ema")
    parser.add_argument("--log-every", type=int, default=100, help="steps between log lines and metrics.jsonl records")
    parser.add_argument("--ckpt-every", type=int, default=50_000, help="steps between checkpoints (a stop signal also writes one)")
    parser.add_argument("--sample-every", type=int, default=0, help="save an EMA sample grid every N steps (0: never)")
    parser.add_argument("--sample-steps", type=int, default=50, help="DDPM steps for the sample grids")
    parser.add_argument(
        "--tensorboard", action="store_true",
        help="also write the metrics and sample grids as TensorBoard events to <experiment>/tensorboard (needs tensorboard)",
    )
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate, constant, no weight decay (paper Section 4)")
    parser.add_argument("--ema-decay", type=float, default=0.9999, help="decay of the EMA weights that sampling uses")
    add_precision_flag(parser, default="tf32")
    parser.add_argument("--grad-checkpointing", action="store_true", help="recompute activations to save memory")
    add_compile_flag(parser)
    parser.add_argument(
        "--attention", type=str, choices=("fused", "plain"), default="fused",
        help="fused: scaled_dot_product_attention; plain: the written-out formula (faster for bf16 training on CPUs)",
    )
    parser.add_argument("--resume", type=str, default=None, help="a checkpoint to continue, or 'auto' for the newest one that loads")
    parser.add_argument(
        "--init-from", type=str, default=None,
        help="fine-tune: start from the model and EMA weights of a checkpoint path or a released name "
        f"({', '.join(PRETRAINED_MODELS)}), with a new optimizer at step 0; ignored when resuming",
    )
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------
# Building blocks (also used by benchmarks)
# ----------------------------------------------------------------------------------------


def build_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.AdamW:
    """AdamW with weight decay 0, betas (0.9, 0.999), as one fused kernel (CUDA and CPU alike)."""
    # All parameters, as the reference passes them (the frozen pos_embed never gets a gradient),
    # so that optimizer state dicts index parameters alike.
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0, fused=True)


def compile_for_training(model: torch.nn.Module) -> torch.nn.Module:
    """torch.compile, with random draws kept eager: compiled graphs would otherwise draw the
    label dropout from inductor's own generator, and differ from an eager run. The setting
    is passed to this compilation alone, never set globally."""
    return torch.compile(model, options={"fallback_random": True})


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema = decay * ema + (1 - decay) * model, over all parameters in two vectorised calls."""
    ema_params = list(ema.parameters())
    torch._foreach_mul_(ema_params, decay)
    torch._foreach_add_(ema_params, [p.detach() for p in model.parameters()], alpha=1 - decay)


def latents_from_images(vae: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Scaled latents: one sample of the VAE posterior of each image.

    Made contiguous because CPU convolutions may return channels-last tensors, and the
    diffusion's randn_like(latents) fills memory in order: the noise a step draws must not
    depend on the convolution backend (or differ between images and features).
    """
    return encode(vae, images).contiguous()


def latents_from_features(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Scaled latents from a stored posterior: (mean + std * eps) * 0.18215, eps ~ N(0, I) from
    the global generator, drawn exactly as the VAE's own posterior sample draws it."""
    mean, std = mean.float(), std.float()
    return (mean + std * torch.randn_like(mean)) * LATENT_SCALE


def total_grad_norm(model: torch.nn.Module) -> torch.Tensor:
    """The 2-norm of all gradients together, as a device tensor (no host sync)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def micro_batch_backward(
    model: torch.nn.Module,
    diffusion: SpacedDiffusion,
    latents: torch.Tensor,
    labels: torch.Tensor,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    *,
    loss_weight: float = 1.0,
    precision: str = "fp32",
    scaler: torch.amp.GradScaler | None = None,
) -> torch.Tensor:
    """Add the gradient of loss_weight x the mean hybrid diffusion loss of one batch to the
    parameters' gradients; return that mean loss (detached, on the device).

    Timesteps are uniform and the noise Gaussian unless given. Under bf16/fp16 only the model
    runs in autocast; the loss is computed in fp32.
    """
    scaler = scaler or grad_scaler("fp32", latents.device)
    if t is None:
        t = torch.randint(0, diffusion.num_timesteps, (latents.shape[0],), device=latents.device)

    def forward(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with autocast(precision, latents.device):
            return model(x, t, y).float()

    loss = diffusion.training_losses(forward, latents, t, dict(y=labels), noise=noise)["loss"].mean()
    scaler.scale(loss * loss_weight if loss_weight != 1.0 else loss).backward()
    return loss.detach()


def optimizer_update(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, with_grad_norm: bool = False
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """One optimizer step on the accumulated gradients. Returns the gradient norm when asked and,
    under fp16 loss scaling, whether the step was skipped for inf/NaN gradients (device tensors)."""
    grad_norm = skipped = None
    if with_grad_norm or scaler.is_enabled():
        scaler.unscale_(optimizer)  # a no-op unless loss scaling is on
        grad_norm = total_grad_norm(model)
    if scaler.is_enabled():
        # The scaler skips the update exactly when some gradient is inf/NaN, i.e. when the norm is.
        skipped = ~torch.isfinite(grad_norm)
    scaler.step(optimizer)
    scaler.update()
    return grad_norm if with_grad_norm else None, skipped


def accumulated_step(
    model: torch.nn.Module,
    diffusion: SpacedDiffusion,
    optimizer: torch.optim.Optimizer,
    micro_batches: Iterable[tuple[torch.Tensor, ...]],
    accum_steps: int,
    precision: str = "fp32",
    with_grad_norm: bool = False,
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One optimizer step on the mean loss of `accum_steps` equal micro-batches, each
    (latents, labels) or (latents, labels, t, noise), taken one at a time.

    Each micro-batch loss is weighted 1/accum_steps and DDP averages over the processes, so the
    gradient is that of the mean loss over the global batch. DDP all-reduces only after the
    last micro-batch (no_sync on the others). Returns the mean loss, then as optimizer_update.
    """
    scaler = scaler or grad_scaler("fp32", next(model.parameters()).device)
    optimizer.zero_grad(set_to_none=True)
    no_sync = getattr(model, "no_sync", None)  # DDP's, also through torch.compile's wrapper
    total = None
    for index, micro_batch in enumerate(micro_batches):
        last = index == accum_steps - 1
        with no_sync() if no_sync is not None and not last else nullcontext():
            loss = micro_batch_backward(
                model, diffusion, *micro_batch, loss_weight=1 / accum_steps, precision=precision, scaler=scaler
            )
        total = loss if total is None else total + loss
    grad_norm, skipped = optimizer_update(model, optimizer, scaler, with_grad_norm)
    return total / accum_steps if accum_steps > 1 else total, grad_norm, skipped


def training_step(
    model: torch.nn.Module,
    diffusion: SpacedDiffusion,
    optimizer: torch.optim.Optimizer,
    latents: torch.Tensor,
    labels: torch.Tensor,
    precision: str = "fp32",
    with_grad_norm: bool = False,
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One optimizer step on one batch: accumulated_step without accumulation."""
    return accumulated_step(model, diffusion, optimizer, [(latents, labels)], 1, precision, with_grad_norm, scaler)


@torch.no_grad()
def sample_images(
    ema: DiT,
    vae: torch.nn.Module,
    num_sampling_steps: int,
    num_classes: int,
    seed: int,
    precision: str = "fp32",
) -> torch.Tensor:
    """SAMPLE_COUNT EMA samples with guidance SAMPLE_CFG_SCALE (none for a model without a null
    label), as images in [-1, 1].

    Noise and labels come from a private generator seeded with `seed`: every call draws the
    same ones (so grids are comparable over training) and the training RNG is left untouched.
    """
    device = next(ema.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    shape = (SAMPLE_COUNT, ema.in_channels, ema.input_size, ema.input_size)
    z = torch.randn(shape, generator=generator, device=device)
    y = torch.randint(0, num_classes, (SAMPLE_COUNT,), generator=generator, device=device)

    def noise_fn(x: torch.Tensor) -> torch.Tensor:
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)

    diffusion = create_sampler(num_sampling_steps, "ddpm")
    cfg_scale = SAMPLE_CFG_SCALE if ema.y_embedder.dropout_prob > 0 else None
    latents = denoise(ema, diffusion, z, y, cfg_scale, precision=precision, noise_fn=noise_fn)
    return decode(vae, latents)


# ----------------------------------------------------------------------------------------
# Run set-up: validation, experiment folders, checkpoints
# ----------------------------------------------------------------------------------------


def validate_values(args: argparse.Namespace) -> None:
    """Exit with one sentence on a flag value out of its range, before any folder or work."""
    if args.data_path is not None and args.feature_path is not None:
        raise SystemExit("pass either --data-path (images) or --feature-path (features made by extract_features.py), not both")
    for flag in ("global_batch_size", "grad_accum_steps", "epochs", "num_classes", "log_every", "ckpt_every"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"--{flag.replace('_', '-')} must be at least 1, not {getattr(args, flag)}")
    for flag in ("max_steps", "num_workers"):
        if getattr(args, flag) is not None and getattr(args, flag) < 0:
            raise SystemExit(f"--{flag.replace('_', '-')} must be 0 or more, not {getattr(args, flag)}")
    if args.sample_every < 0:
        raise SystemExit(f"--sample-every must be 0 (never) or more, not {args.sample_every}")
    if not 1 <= args.sample_steps <= DIFFUSION_STEPS:
        raise SystemExit(f"--sample-steps must be between 1 and {DIFFUSION_STEPS} (the diffusion's steps), not {args.sample_steps}")
    if not (math.isfinite(args.lr) and args.lr >= 0):
        raise SystemExit(f"--lr must be a finite number of 0 or more, not {args.lr}")
    if not 0 <= args.ema_decay <= 1:  # also refuses nan
        raise SystemExit(f"--ema-decay must be between 0 and 1, not {args.ema_decay}")
    problem = output_folder_problem(args.results_dir, "--results-dir")
    if problem:
        raise SystemExit(problem)
    if args.feature_path is not None and os.path.exists(args.feature_path) and not os.path.isdir(args.feature_path):
        raise SystemExit(f"--feature-path {args.feature_path} is a file, not a folder")


def validate_args(args: argparse.Namespace, world_size: int) -> None:
    """Exit with one sentence on settings that cannot work, before any work starts."""
    validate_values(args)
    patch_size = int(args.model.split("/")[-1])
    if args.data_path is None and args.feature_path is None:
        raise SystemExit("pass --data-path (an image folder) or --feature-path (the output of extract_features.py)")
    if args.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise SystemExit("--tensorboard needs the tensorboard package, which is not installed: pip install tensorboard")
    if not 0 <= args.class_dropout_prob < 1:
        raise SystemExit(f"--class-dropout-prob must lie in [0, 1), got {args.class_dropout_prob}")
    if args.global_batch_size % (world_size * args.grad_accum_steps):
        raise SystemExit(
            f"--global-batch-size {args.global_batch_size} is not divisible by the world size {world_size}"
            + (f" times --grad-accum-steps {args.grad_accum_steps}" if args.grad_accum_steps > 1 else "")
        )
    try:
        latent = latent_size(args.image_size)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    if latent % patch_size:
        raise SystemExit(
            f"--image-size {args.image_size} gives {latent}x{latent} latents, which "
            f"{args.model} cannot cut into {patch_size}x{patch_size} patches; use a multiple of {8 * patch_size}"
        )
    if args.resume not in (None, "auto") and not os.path.isfile(args.resume):
        raise SystemExit(f"--resume {args.resume} does not exist")
    if args.init_from is not None and args.init_from not in PRETRAINED_MODELS and not os.path.isfile(args.init_from):
        raise SystemExit(
            f"--init-from {args.init_from} does not exist; pass a checkpoint file or a released name ({', '.join(PRETRAINED_MODELS)})"
        )


def open_dataset(args: argparse.Namespace) -> FeatureDataset | ImageDataset:
    """The training set (features when --feature-path is given), checked against the settings."""
    try:
        dataset = FeatureDataset(args.feature_path) if args.feature_path else ImageDataset(args.data_path, args.image_size)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    if args.feature_path and dataset.meta["image_size"] != args.image_size:
        raise SystemExit(
            f"the features in {args.feature_path} were extracted at --image-size {dataset.meta['image_size']}, not {args.image_size}"
        )
    num_classes = len(dataset.meta["classes"]) if args.feature_path else len(dataset.classes)
    if num_classes > args.num_classes:
        raise SystemExit(f"the data has {num_classes} classes but --num-classes is {args.num_classes}")
    if len(dataset) < args.global_batch_size:
        raise SystemExit(f"the dataset has {len(dataset)} images, fewer than --global-batch-size {args.global_batch_size}")
    return dataset


def check_feature_vae(args: argparse.Namespace, dataset: FeatureDataset, vae: torch.nn.Module) -> None:
    if vae_encoder_fingerprint(vae) != dataset.meta["vae_encoder"]:
        used = args.vae_path or HUB_VAES[args.vae]
        raise SystemExit(
            f"the features in {args.feature_path} were extracted with another VAE ({dataset.meta['vae']}) than {used}"
        )


def experiment_name(model: str) -> str:
    return model.replace("/", "-")


def check_resumable(checkpoint: dict, path: str, args: argparse.Namespace, dataset_size: int) -> None:
    """Exit with one sentence unless `checkpoint` continues this run's settings. The number of
    processes and the accumulation split may change: only the global batch decides the data order."""
    missing = missing_entries(checkpoint, RESUME_KEYS)
    if missing:
        raise SystemExit(f"{path} is not a train.py checkpoint that can be resumed (it lacks {', '.join(missing)})")
    differences = setting_differences(checkpoint["args"], vars(args), RESUME_MATCHING_ARGS)
    differences += data_differences(checkpoint["args"], args)
    saved_null_label = checkpoint["args"].get("class_dropout_prob", 0.1) > 0  # older checkpoints: the default
    if saved_null_label != (args.class_dropout_prob > 0):
        differences.append(f"{'a' if saved_null_label else 'no'} null label (--class-dropout-prob {args.class_dropout_prob} now)")
    if checkpoint["dataset_size"] != dataset_size:
        differences.append(f"a dataset of {checkpoint['dataset_size']} images (now {dataset_size})")
    if differences:
        raise SystemExit(f"cannot resume from {path}: it was trained with {', '.join(differences)}; resume with the same settings")


def data_differences(saved: dict, args: argparse.Namespace) -> list[str]:
    """'--data-path saved (now current)' when a checkpoint was trained on another image folder or feature store."""
    differences = []
    for key in ("data_path", "feature_path"):
        before, now = saved.get(key), getattr(args, key)
        if (before and os.path.abspath(before)) != (now and os.path.abspath(now)):
            differences.append(f"--{key.replace('_', '-')} {before} (now {now})")
    return differences


def open_resume_checkpoint(
    args: argparse.Namespace, dataset_size: int, notes: list[str]
) -> tuple[dict | None, str | None]:
    """The checkpoint that --resume names (checked against the settings) and its path, or (None, None).

    `--resume auto` takes the newest checkpoint of the model that loads: one that a crash left
    damaged is skipped with a line in `notes`.
    """
    try:
        if args.resume == "auto":
            candidates = checkpoints_newest_first(args.results_dir, experiment_name(args.model))
            found = load_newest_good_checkpoint(candidates, notes.append)
        else:
            found = (args.resume, load_checkpoint(args.resume, map_location="cpu")) if args.resume else None
    except ValueError as error:
        raise SystemExit(str(error)) from None
    if found is None:
        return None, None
    path, checkpoint = found
    check_resumable(checkpoint, path, args, dataset_size)
    return checkpoint, path


def open_vae(
    args: argparse.Namespace, dataset: FeatureDataset | ImageDataset, device: torch.device, notes: list[str]
) -> torch.nn.Module | None:
    """The VAE, where training needs it: to encode images, or to decode sample grids.

    Training from features without sample grids loads none, unless --vae-path names a local VAE
    other than the features' own: then it is loaded (no network) to check that it matches.
    """
    using_features = args.feature_path is not None
    needs_vae = not using_features or args.sample_every > 0
    if not needs_vae and args.vae_path in (None, dataset.meta["vae"]):
        notes.append(f"no VAE loaded: training from features made with {dataset.meta['vae']}, and no sample grids asked")
        return None
    try:
        vae = load_vae(args.vae, device if needs_vae else torch.device("cpu"), args.vae_path)
    except (FileNotFoundError, RuntimeError, ValueError) as error:  # load_vae's one-sentence errors
        raise SystemExit(str(error)) from None
    if using_features:
        check_feature_vae(args, dataset, vae)
    return vae if needs_vae else None


def experiment_folder(args: argparse.Namespace, resume_path: str | None, is_main: bool) -> str | None:
    """Rank 0's experiment folder: the resumed run's own, or a new one (None on other ranks)."""
    if not is_main:
        return None
    if resume_path is not None and os.path.basename(os.path.dirname(resume_path)) == "checkpoints":
        return os.path.dirname(os.path.dirname(os.path.abspath(resume_path)))
    try:
        return create_run_dir(args.results_dir, experiment_name(args.model))
    except WriteError as error:
        raise SystemExit(str(error)) from None


def tidy_resumed_folder(experiment_dir: str, step: int) -> None:
    """Remove what a killed run left: temporary checkpoint files, and metrics records after the
    resumed step (this run logs those steps again) or cut off mid-line."""
    stale = remove_stale_temporaries(os.path.join(experiment_dir, "checkpoints"))
    if stale:
        logger.info(f"removed {len(stale)} stale temporary checkpoint file(s): {', '.join(stale)}")
    dropped = trim_metrics(os.path.join(experiment_dir, "metrics.jsonl"), step)
    if dropped:
        logger.info(f"metrics.jsonl: dropped {dropped} record(s) after step {step} or cut off, as this run logs those steps again")


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


def parameters_are_finite(model: torch.nn.Module) -> bool:
    # The max-abs norm cannot overflow, unlike the 2-norm of large but finite weights.
    return bool(torch.stack(torch._foreach_norm(list(model.parameters()), ord=float("inf"))).isfinite().all())


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated by tensors, or on a CPU the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux reports KiB


# ----------------------------------------------------------------------------------------
# Training state and checkpoints
# ----------------------------------------------------------------------------------------


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
    tensorboard: SummaryWriter | None = None  # rank 0's, with --tensorboard


def build_run(args: argparse.Namespace, info: DistInfo, dataset_size: int) -> Run:
    """A fresh model, its EMA copy (the reference initialises both alike), optimizer and loss scaler."""
    model = DiT_models[args.model](
        input_size=args.image_size // 8,
        num_classes=args.num_classes,
        class_dropout_prob=args.class_dropout_prob,
        fused_attn=args.attention == "fused",
    ).to(info.device)
    ema = deepcopy(model).requires_grad_(False)
    optimizer = build_optimizer(model, args.lr)
    return Run(args, info, dataset_size, model, ema, optimizer, grad_scaler(args.precision, info.device))


def initial_weights(source: str) -> tuple[dict, dict]:
    """(model weights, EMA weights) of a released name (downloaded if absent: its EMA weights are
    both) or of a checkpoint file (a train.py checkpoint, or a bare state dict used for both)."""
    try:
        if source in PRETRAINED_MODELS:
            weights = download_model(source)
            return weights, weights
        checkpoint = load_checkpoint(source)
    except (FileNotFoundError, RuntimeError, ValueError) as error:  # one-sentence errors
        raise SystemExit(str(error).replace("--ckpt PATH", "--init-from PATH")) from None
    if isinstance(checkpoint, dict) and "model" in checkpoint and "ema" in checkpoint:
        return checkpoint["model"], checkpoint["ema"]
    return model_weights(checkpoint), model_weights(checkpoint)


def fitted_initial_weights(run: Run, source: str) -> tuple[dict, dict, str | None]:
    """The model and EMA weights of `source` checked against the model (exits on a mismatch), and
    a note when the label table keeps its fresh initialisation: for another number of classes,
    the other weights carry over, as in fine-tuning a classifier on new classes."""
    model_state, ema_state = initial_weights(source)
    table = LABEL_TABLE
    new_table, old_table = run.model.state_dict()[table], model_state.get(table)
    relabel = old_table is not None and old_table.shape != new_table.shape and old_table.shape[1:] == new_table.shape[1:]
    if relabel:
        model_state, ema_state = {**model_state, table: new_table}, {**ema_state, table: run.ema.state_dict()[table]}
    for module, weights in ((run.model, model_state), (run.ema, ema_state)):
        try:
            check_state_dict(module, weights, what=f"--init-from {source}")
        except ValueError as error:
            raise SystemExit(str(error)) from None
    note = None
    if relabel:
        null = " + the null label" if run.model.y_embedder.dropout_prob > 0 else ""
        note = (
            f"the label table of {source} has {old_table.shape[0]} rows, this run needs {new_table.shape[0]} "
            f"(--num-classes {run.args.num_classes}{null}): it starts from a new random initialisation"
        )
    return model_state, ema_state, note


def init_from(run: Run, source: str, model_state: dict, ema_state: dict, note: str | None) -> None:
    """Start from the weights to fine-tune (a new optimizer, at step 0)."""
    run.model.load_state_dict(model_state, strict=True)
    run.ema.load_state_dict(ema_state, strict=True)
    logger.info(f"initialised the model and EMA weights from {source} (new optimizer, step 0)")
    if note:
        logger.info(note)


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
        "rng": rng,
        "scaler": run.scaler.state_dict(),  # {} unless fp16
    }


def stop_on_divergence(state: TrainState) -> None:
    """Exit naming the steps where the loss or weights went non-finite, without saving them."""
    first_step = state.checked_step + 1
    where = f"at step {state.step}" if first_step >= state.step else f"between steps {first_step} and {state.step}"
    message = (
        f"the loss or the weights became non-finite {where}; stopping without saving "
        f"these weights (last good checkpoint: {state.last_checkpoint or 'none'})"
    )
    logger.error(message)
    raise SystemExit(message)


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
        raise SystemExit(failure or f"stopping: the first process could not write {path or 'its output'}")


def save_training_checkpoint(run: Run, state: TrainState, stats: RunningStats) -> None:
    """Every rank checks the weights and hands in its RNG state; rank 0 writes the file."""
    if not (stats.loss_sum_is_finite() and parameters_are_finite(run.model)):
        stop_on_divergence(state)
    rng = rng_states_of_all_ranks(run.info.device)
    path = os.path.join(run.experiment_dir, "checkpoints", f"{state.step:07d}.pt") if run.info.is_main else ""
    stop_if_a_write_failed(lambda: save_checkpoint(training_checkpoint(run, state, rng), path), run.info.is_main, path)
    if run.info.is_main:
        logger.info(f"saved checkpoint {path}")
        state.last_checkpoint = path
    state.checked_step = state.saved_step = state.step


# ----------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------


class RunningStats:
    """Loss, skipped-image and skipped-step sums between log steps, kept on the devices until a
    log step; and the totals of skipped images and steps since the start of this process."""

    def __init__(self, device: torch.device):
        self.device = device
        self.skipped_total = self.skipped_steps_total = 0
        self.grad_norm: torch.Tensor | None = None  # of the newest step that computed it
        self.reset()

    def reset(self) -> None:
        self.loss = torch.zeros((), device=self.device)
        self.skipped = torch.zeros(())
        self.skipped_steps = torch.zeros((), device=self.device)
        self.steps = 0
        self.start = time.time()

    def add_skipped(self, skipped: torch.Tensor) -> None:
        self.skipped += skipped.sum()

    def add(self, loss: torch.Tensor, skipped_step: torch.Tensor | None = None, grad_norm: torch.Tensor | None = None) -> None:
        self.loss += loss
        if skipped_step is not None:
            self.skipped_steps += skipped_step
        if grad_norm is not None:
            self.grad_norm = grad_norm
        self.steps += 1

    def reduce(self, world_size: int) -> tuple[float, float]:
        """Mean loss over steps and ranks and steps/s since the last call; adds the unreadable
        images met by all ranks and the optimizer steps skipped by fp16 loss scaling (the same
        on every rank) to the totals; then resets."""
        means = all_reduce_mean(torch.stack([self.loss / self.steps, self.skipped.to(self.device), self.skipped_steps]))
        self.skipped_total += round(means[1].item() * world_size)
        self.skipped_steps_total += round(means[2].item())
        loss, steps_per_sec = means[0].item(), self.steps / (time.time() - self.start)
        self.reset()
        return loss, steps_per_sec

    def loss_sum_is_finite(self) -> bool:
        """Whether every rank's losses since the last log step are finite (a collective call)."""
        return bool(all_reduce_mean(self.loss.clone()).isfinite())


def log_metrics(run: Run, state: TrainState, stats: RunningStats) -> None:
    """Reduce the statistics since the last log step over the ranks; log them and append them to
    metrics.jsonl. Stops the run if the loss has become non-finite."""
    loss, steps_per_sec = stats.reduce(run.info.world_size)
    if not math.isfinite(loss):
        stop_on_divergence(state)
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


def save_samples(run: Run, vae: torch.nn.Module, step: int) -> None:
    """Rank 0 saves a grid of EMA samples, the same noise and labels at every step."""
    if not run.info.is_main:
        return
    path = os.path.join(run.experiment_dir, "samples", f"{step:07d}.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    args = run.args
    samples = sample_images(run.ema, vae, args.sample_steps, args.num_classes, args.global_seed, args.precision)
    save_grid(samples, path)
    logger.info(f"saved samples {path}")
    if run.tensorboard is not None:  # the same grid as the PNG
        run.tensorboard.add_image("samples", make_grid(samples, nrow=4, normalize=True, value_range=(-1, 1)), step)


def batch_to_device(batch: list, vae: torch.nn.Module | None, using_features: bool, device: torch.device):
    """A loader batch -> (latents, labels, number of unreadable images replaced)."""
    if using_features:
        mean, std, labels, skipped = batch
        latents = latents_from_features(mean.to(device, non_blocking=True), std.to(device, non_blocking=True))
    else:
        images, labels, skipped = batch
        latents = latents_from_images(vae, images.to(device, non_blocking=True))
    return latents, labels.to(device, non_blocking=True), skipped


def micro_batch_size(args: argparse.Namespace, world_size: int) -> int:
    """Images per process per backward pass: global batch = micro-batch x accumulation steps x processes."""
    return args.global_batch_size // (world_size * args.grad_accum_steps)


def next_micro_batches(
    batches: Iterator, count: int, vae: torch.nn.Module | None, using_features: bool, device: torch.device, stats: RunningStats
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The next `count` loader batches as (latents, labels) on the device, made one at a time when
    asked for (so one micro-batch's images are in memory at once); counts the unreadable images."""
    for _ in range(count):
        latents, labels, skipped = batch_to_device(next(batches), vae, using_features, device)
        stats.add_skipped(skipped)
        yield latents, labels


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


def wrap_for_training(model: DiT, args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    """The model in training mode, in DDP under torchrun, compiled when asked."""
    model.set_grad_checkpointing(args.grad_checkpointing)
    model.train()
    wrapped = DDP(model, device_ids=[device] if device.type == "cuda" else None) if dist.is_initialized() else model
    return compile_for_training(wrapped) if args.compile else wrapped


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    info = setup_distributed()
    try:
        with StopRequest() as stop:
            train(args, info, stop)
    finally:
        cleanup_distributed()


def stop_on_signal(run: Run, state: TrainState, stats: RunningStats, signal_number: int) -> None:
    """Save this step (unless just saved) and exit as the signal would have (128 + its number),
    saying how to continue. Every rank calls it at the same step (see max_over_ranks)."""
    if state.saved_step != state.step:
        save_training_checkpoint(run, state, stats)
    logger.info(
        f"stopped by {signal.Signals(signal_number).name} after step {state.step}: "
        f"saved checkpoint {state.last_checkpoint}; continue with --resume auto"
    )
    raise SystemExit(exit_code(signal_number))


def set_up(args: argparse.Namespace, info: DistInfo) -> tuple[Run, TrainState, Dataset, torch.nn.Module | None]:
    """Check the settings, open the data (and the checkpoint to resume or the weights to fine-tune),
    build what is trained, make the experiment folder and the logger, then load the weights."""
    validate_args(args, info.world_size)
    args.precision, precision_note = setup_precision(args.precision, info.device)  # `auto` -> what it chose
    torch.manual_seed(args.global_seed * info.world_size + info.rank)
    dataset = open_dataset(args)
    notes: list[str] = []  # said once the logger exists
    checkpoint, resume_path = open_resume_checkpoint(args, len(dataset), notes)
    vae = open_vae(args, dataset, info.device, notes)

    run = build_run(args, info, len(dataset))
    fine_tune = args.init_from is not None and checkpoint is None
    initial = fitted_initial_weights(run, args.init_from) if fine_tune else None

    run.experiment_dir = experiment_folder(args, resume_path, info.is_main)
    create_logger(run.experiment_dir, info.rank)
    logger.info(f"experiment folder {run.experiment_dir}; {info.world_size} process(es) on {info.device}; arguments {vars(args)}")
    if precision_note:
        logger.info(precision_note)
    for note in notes:
        logger.info(note)
    if args.resume == "auto" and resume_path is None:
        logger.info(f"--resume auto found no checkpoint of {args.model} in {args.results_dir}: starting a new run")
    if args.init_from is not None and not fine_tune:
        logger.info(f"resuming: --init-from {args.init_from} is not used")

    if args.tensorboard and info.is_main:
        from torch.utils.tensorboard import SummaryWriter  # an optional dependency

        run.tensorboard = SummaryWriter(os.path.join(run.experiment_dir, "tensorboard"))
    state = TrainState()
    if initial is not None:
        init_from(run, args.init_from, *initial)
    if checkpoint is not None:
        state = restore_run(run, checkpoint, resume_path)
        if info.is_main:
            tidy_resumed_folder(run.experiment_dir, state.step)
        restore_rng_state(checkpoint, state.step, info, args.global_seed)  # after everything that draws numbers
    return run, state, dataset, vae


def train(args: argparse.Namespace, info: DistInfo, stop: StopRequest) -> None:
    run, state, dataset, vae = set_up(args, info)
    ema, device = run.ema.eval(), info.device
    train_model = wrap_for_training(run.model, args, device)
    diffusion = create_diffusion(timestep_respacing="")
    logger.info(f"{args.model}: {sum(p.numel() for p in run.model.parameters()):,} parameters")

    per_rank_batch = args.global_batch_size // info.world_size
    sampler, loader = make_loader(dataset, args, info)
    # Whole global batches only, the same number whatever the processes (see EpochSampler).
    steps_per_epoch = len(dataset) // args.global_batch_size
    using_features = args.feature_path is not None
    source = f"features in {args.feature_path}" if using_features else f"images in {args.data_path}"
    logger.info(
        f"{len(dataset):,} {source}; {steps_per_epoch} steps per epoch; global batch {args.global_batch_size} = "
        f"{micro_batch_size(args, info.world_size)} images x {args.grad_accum_steps} micro-batches x {info.world_size} process(es)"
    )

    max_steps = args.max_steps if args.max_steps is not None else float("inf")
    logger.info(f"training for {args.epochs} epochs" + (f" or {args.max_steps} steps" if args.max_steps else ""))
    stats = RunningStats(device)
    while state.epoch < args.epochs and state.step < max_steps:
        sampler.set_epoch(state.epoch, state.epoch_step * per_rank_batch)
        batches = iter(loader)
        for _ in range(steps_per_epoch - state.epoch_step):
            micro_batches = next_micro_batches(batches, args.grad_accum_steps, vae, using_features, device, stats)
            with_grad_norm = (state.step + 1) % args.log_every == 0
            loss, grad_norm, skipped_step = accumulated_step(
                train_model, diffusion, run.optimizer, micro_batches, args.grad_accum_steps,
                args.precision, with_grad_norm, run.scaler,
            )
            update_ema(ema, run.model, args.ema_decay)  # EMA, logs and checkpoints per optimizer step
            stats.add(loss, skipped_step, grad_norm)
            state.advance(steps_per_epoch)

            if state.step % args.log_every == 0:
                log_metrics(run, state, stats)
            if state.step % args.ckpt_every == 0:
                save_training_checkpoint(run, state, stats)
            if signal_number := max_over_ranks(stop.signal_number):  # SIGTERM or SIGUSR1 on any rank
                stop_on_signal(run, state, stats, signal_number)
            if args.sample_every and state.step % args.sample_every == 0:
                save_samples(run, vae, state.step)
            if state.step >= max_steps:
                break

    if state.saved_step != state.step:
        save_training_checkpoint(run, state, stats)
    if run.tensorboard is not None:
        run.tensorboard.close()
    logger.info(f"done after {state.step} steps")


if __name__ == "__main__":
    main()
