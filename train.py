"""Train a class-conditional DiT on latents of an image folder (or of pre-extracted features).

  torchrun --nnodes=1 --nproc_per_node=8 train.py --model DiT-XL/2 --data-path /data/imagenet/train
  python train.py --model DiT-S/8 --data-path DIR          (one process, on a GPU or the CPU)

Each run writes results/NNN-<model>/ with log.txt, metrics.jsonl, checkpoints/ and
(with --sample-every) samples/. `--resume auto` continues the newest run of the model.
SIGTERM or SIGUSR1 (preemption, a time limit) saves a checkpoint after the current step and exits.
The building blocks (optimizer, EMA update, one training step) are importable.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import resource
import signal
import time
from copy import deepcopy
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset

from checkpoint import (
    WriteError,
    append_record,
    checkpoints_newest_first,
    create_run_dir,
    load_checkpoint,
    load_newest_good_checkpoint,
    missing_entries,
    output_folder_problem,
    remove_stale_temporaries,
    save_checkpoint,
    setting_differences,
    trim_metrics,
)
from cli import add_compile_flag, add_model_flags, add_precision_flag, add_vae_flags, make_parser
from data import EpochSampler, FeatureDataset, ImageDataset, vae_encoder_fingerprint
from diffusion import SpacedDiffusion, create_diffusion
from distributed import (
    DistInfo,
    all_reduce_mean,
    any_rank,
    cleanup_distributed,
    create_logger,
    max_over_ranks,
    rng_states_of_all_ranks,
    setup_distributed,
)
from images import save_grid
from models import DiT, DiT_models
from precision import autocast, grad_scaler, setup_precision
from preemption import StopRequest, exit_code, ignore_stop_signals
from sampling import denoise
from vae import HUB_VAES, LATENT_SCALE, decode, encode, latent_size, load_vae

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
    parser.add_argument("--data-path", type=str, default=None, help="ImageFolder root: DIR/<class>/<image>")
    parser.add_argument("--feature-path", type=str, default=None, help="train from extract_features.py output instead of images")
    parser.add_argument("--results-dir", type=str, default="results")
    add_model_flags(parser)
    parser.add_argument("--epochs", type=int, default=1400)
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps in total")
    parser.add_argument("--global-batch-size", type=int, default=256)
    parser.add_argument("--global-seed", type=int, default=0)
    add_vae_flags(parser, default="ema")
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--ckpt-every", type=int, default=50_000)
    parser.add_argument("--sample-every", type=int, default=0, help="save an EMA sample grid every N steps (0: never)")
    parser.add_argument("--sample-steps", type=int, default=50, help="DDPM steps for the sample grids")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--ema-decay", type=float, default=0.9999)
    add_precision_flag(parser, default="tf32")
    parser.add_argument("--grad-checkpointing", action="store_true", help="recompute activations to save memory")
    add_compile_flag(parser)
    parser.add_argument(
        "--attention", type=str, choices=("fused", "plain"), default="fused",
        help="fused: scaled_dot_product_attention; plain: the written-out formula (faster for bf16 training on CPUs)",
    )
    parser.add_argument("--resume", type=str, default=None, help="a checkpoint to continue, or 'auto' for the newest one that loads")
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
    """One optimizer step on the hybrid diffusion loss at uniform timesteps.

    Returns the (detached) mean loss, the gradient norm when asked, and, under fp16 loss
    scaling, whether the step was skipped for inf/NaN gradients; all on the device (no
    host sync). Under bf16/fp16 only the model runs in autocast; the loss is computed in fp32.
    """
    scaler = scaler or grad_scaler("fp32", latents.device)
    t = torch.randint(0, diffusion.num_timesteps, (latents.shape[0],), device=latents.device)

    def forward(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with autocast(precision, latents.device):
            return model(x, t, y).float()

    loss = diffusion.training_losses(forward, latents, t, dict(y=labels))["loss"].mean()
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    grad_norm = skipped = None
    if with_grad_norm or scaler.is_enabled():
        scaler.unscale_(optimizer)  # a no-op unless loss scaling is on
        grad_norm = total_grad_norm(model)
    if scaler.is_enabled():
        # The scaler skips the update exactly when some gradient is inf/NaN, i.e. when the norm is.
        skipped = ~torch.isfinite(grad_norm)
    scaler.step(optimizer)
    scaler.update()
    return loss.detach(), grad_norm if with_grad_norm else None, skipped


@torch.no_grad()
def sample_images(
    ema: DiT,
    vae: torch.nn.Module,
    num_sampling_steps: int,
    num_classes: int,
    seed: int,
    precision: str = "fp32",
) -> torch.Tensor:
    """SAMPLE_COUNT EMA samples with guidance SAMPLE_CFG_SCALE, as images in [-1, 1].

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

    diffusion = create_diffusion(str(num_sampling_steps))
    latents = denoise(ema, diffusion, z, y, SAMPLE_CFG_SCALE, precision=precision, noise_fn=noise_fn)
    return decode(vae, latents)


# ----------------------------------------------------------------------------------------
# Run set-up: validation, experiment folders, checkpoints
# ----------------------------------------------------------------------------------------


def validate_values(args: argparse.Namespace) -> None:
    """Exit with one sentence on a flag value out of its range, before any folder or work."""
    if args.data_path is not None and args.feature_path is not None:
        raise SystemExit("pass either --data-path (images) or --feature-path (features made by extract_features.py), not both")
    for flag, low in (("global_batch_size", 1), ("epochs", 1), ("num_classes", 1), ("log_every", 1), ("ckpt_every", 1)):
        if getattr(args, flag) < low:
            raise SystemExit(f"--{flag.replace('_', '-')} must be at least {low}, not {getattr(args, flag)}")
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
    if args.global_batch_size % world_size:
        raise SystemExit(f"--global-batch-size {args.global_batch_size} is not divisible by the world size {world_size}")
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


def open_dataset(args: argparse.Namespace, per_rank_batch: int, world_size: int) -> FeatureDataset | ImageDataset:
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
    if -(-len(dataset) // world_size) < per_rank_batch:
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


def check_resumable(checkpoint: dict, path: str, args: argparse.Namespace, world_size: int, dataset_size: int) -> None:
    """Exit with one sentence unless `checkpoint` continues this run's settings."""
    missing = missing_entries(checkpoint, RESUME_KEYS)
    if missing:
        raise SystemExit(f"{path} is not a train.py checkpoint that can be resumed (it lacks {', '.join(missing)})")
    differences = setting_differences(checkpoint["args"], vars(args), RESUME_MATCHING_ARGS)
    differences += data_differences(checkpoint["args"], args)
    if checkpoint["world_size"] != world_size:
        differences.append(f"{checkpoint['world_size']} processes (now {world_size})")
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
    args: argparse.Namespace, world_size: int, dataset_size: int, notes: list[str]
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
    check_resumable(checkpoint, path, args, world_size, dataset_size)
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


def restore_rng_state(states: list[dict], rank: int, device: torch.device) -> None:
    torch.set_rng_state(states[rank]["cpu"])
    if device.type == "cuda" and states[rank]["cuda"] is not None:
        torch.cuda.set_rng_state(states[rank]["cuda"], device)


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
        if self.epoch_step == steps_per_epoch:  # the loader drops the last partial batch
            self.epoch, self.epoch_step = self.epoch + 1, 0


@dataclass
class Run:
    """What stays the same over a run: the settings, the processes, the folder and what is trained."""

    args: argparse.Namespace
    info: DistInfo
    experiment_dir: str | None
    dataset_size: int
    model: DiT
    ema: DiT
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler


def build_run(args: argparse.Namespace, info: DistInfo, experiment_dir: str | None, dataset_size: int) -> Run:
    """A fresh model, its EMA copy (the reference initialises both alike), optimizer and loss scaler."""
    model = DiT_models[args.model](
        input_size=args.image_size // 8, num_classes=args.num_classes, fused_attn=args.attention == "fused"
    ).to(info.device)
    ema = deepcopy(model).requires_grad_(False)
    optimizer = build_optimizer(model, args.lr)
    return Run(args, info, experiment_dir, dataset_size, model, ema, optimizer, grad_scaler(args.precision, info.device))


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
    logger.info(f"resuming from {path} at step {step} (epoch {epoch}, batch {epoch_step} of the epoch)")
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

    def add(
        self, loss: torch.Tensor, skipped: torch.Tensor, skipped_step: torch.Tensor | None = None, grad_norm: torch.Tensor | None = None
    ) -> None:
        self.loss += loss
        self.skipped += skipped.sum()
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


def save_samples(run: Run, vae: torch.nn.Module, step: int) -> None:
    """Rank 0 saves a grid of EMA samples, the same noise and labels at every step."""
    if not run.info.is_main:
        return
    path = os.path.join(run.experiment_dir, "samples", f"{step:07d}.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    args = run.args
    save_grid(sample_images(run.ema, vae, args.sample_steps, args.num_classes, args.global_seed, args.precision), path)
    logger.info(f"saved samples {path}")


def batch_to_device(batch: list, vae: torch.nn.Module | None, using_features: bool, device: torch.device):
    """A loader batch -> (latents, labels, number of unreadable images replaced)."""
    if using_features:
        mean, std, labels, skipped = batch
        latents = latents_from_features(mean.to(device, non_blocking=True), std.to(device, non_blocking=True))
    else:
        images, labels, skipped = batch
        latents = latents_from_images(vae, images.to(device, non_blocking=True))
    return latents, labels.to(device, non_blocking=True), skipped


def make_loader(dataset: Dataset, args: argparse.Namespace, info: DistInfo, per_rank_batch: int) -> tuple[EpochSampler, DataLoader]:
    """This rank's loader over the shuffled epochs (see EpochSampler), in per-rank batches."""
    sampler = EpochSampler(len(dataset), info.rank, info.world_size, args.global_seed)
    loader = DataLoader(
        dataset,
        batch_size=per_rank_batch,
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
    """Check the settings, open the data (and the checkpoint to resume), make the experiment
    folder and the logger, and build or restore what is trained."""
    validate_args(args, info.world_size)
    args.precision, precision_note = setup_precision(args.precision, info.device)  # `auto` -> what it chose
    torch.manual_seed(args.global_seed * info.world_size + info.rank)
    dataset = open_dataset(args, args.global_batch_size // info.world_size, info.world_size)
    notes: list[str] = []  # said once the logger exists
    checkpoint, resume_path = open_resume_checkpoint(args, info.world_size, len(dataset), notes)
    vae = open_vae(args, dataset, info.device, notes)

    experiment_dir = experiment_folder(args, resume_path, info.is_main)
    create_logger(experiment_dir, info.rank)
    logger.info(f"experiment folder {experiment_dir}; {info.world_size} process(es) on {info.device}; arguments {vars(args)}")
    if precision_note:
        logger.info(precision_note)
    for note in notes:
        logger.info(note)
    if args.resume == "auto" and resume_path is None:
        logger.info(f"--resume auto found no checkpoint of {args.model} in {args.results_dir}: starting a new run")

    run = build_run(args, info, experiment_dir, len(dataset))
    state = TrainState()
    if checkpoint is not None:
        state = restore_run(run, checkpoint, resume_path)
        if info.is_main:
            tidy_resumed_folder(experiment_dir, state.step)
        restore_rng_state(checkpoint["rng"], info.rank, info.device)  # after everything that draws numbers
    return run, state, dataset, vae


def train(args: argparse.Namespace, info: DistInfo, stop: StopRequest) -> None:
    run, state, dataset, vae = set_up(args, info)
    ema, device = run.ema.eval(), info.device
    train_model = wrap_for_training(run.model, args, device)
    diffusion = create_diffusion(timestep_respacing="")
    logger.info(f"{args.model}: {sum(p.numel() for p in run.model.parameters()):,} parameters")

    per_rank_batch = args.global_batch_size // info.world_size
    sampler, loader = make_loader(dataset, args, info, per_rank_batch)
    steps_per_epoch = sampler.samples_per_rank // per_rank_batch
    using_features = args.feature_path is not None
    source = f"features in {args.feature_path}" if using_features else f"images in {args.data_path}"
    logger.info(f"{len(dataset):,} {source}; {steps_per_epoch} steps per epoch")

    max_steps = args.max_steps if args.max_steps is not None else float("inf")
    logger.info(f"training for {args.epochs} epochs" + (f" or {args.max_steps} steps" if args.max_steps else ""))
    stats = RunningStats(device)
    while state.epoch < args.epochs and state.step < max_steps:
        sampler.set_epoch(state.epoch, state.epoch_step * per_rank_batch)
        for batch in loader:
            latents, labels, skipped = batch_to_device(batch, vae, using_features, device)
            with_grad_norm = (state.step + 1) % args.log_every == 0
            loss, grad_norm, skipped_step = training_step(
                train_model, diffusion, run.optimizer, latents, labels, args.precision, with_grad_norm, run.scaler
            )
            update_ema(ema, run.model, args.ema_decay)
            stats.add(loss, skipped, skipped_step, grad_norm)
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
    logger.info(f"done after {state.step} steps")


if __name__ == "__main__":
    main()
