"""Train a class-conditional DiT on latents of an image folder (or of pre-extracted features).

  torchrun --nnodes=1 --nproc_per_node=8 train.py --model DiT-XL/2 --data-path /data/imagenet/train
  python train.py --model DiT-S/8 --data-path DIR          (one process, on a GPU or the CPU)

Each run writes results/NNN-<model>/ with log.txt, metrics.jsonl, checkpoints/ and
(with --sample-every) samples/. `--resume auto` continues the newest run of the model.
The building blocks (optimizer, EMA update, one training step) are importable.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import resource
import time
from copy import deepcopy

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from checkpoint import load_checkpoint, save_checkpoint
from cli import add_compile_flag, add_model_flags, add_precision_flag, add_vae_flags, make_parser
from data import EpochSampler, FeatureDataset, ImageDataset, vae_encoder_fingerprint
from diffusion import SpacedDiffusion, create_diffusion
from distributed import DistInfo, all_reduce_mean, cleanup_distributed, create_logger, setup_distributed
from images import save_grid
from models import DiT, DiT_models
from precision import autocast, grad_scaler, setup_precision
from sampling import denoise
from vae import HUB_VAES, LATENT_SCALE, decode, encode, latent_size, load_vae

# Periodic sample grids: a few EMA samples with classifier-free guidance.
SAMPLE_COUNT = 8
SAMPLE_CFG_SCALE = 4.0
# Checkpoint entries a resumable checkpoint must hold (the reference's four come first).
RESUME_KEYS = ("model", "ema", "opt", "args", "step", "epoch", "epoch_step", "world_size", "dataset_size", "rng")
# Settings a resumed run must share with its checkpoint.
RESUME_MATCHING_ARGS = ("model", "image_size", "num_classes", "global_batch_size", "global_seed")


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
    parser.add_argument("--resume", type=str, default=None, help="a checkpoint to continue, or 'auto' for the newest one")
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


def validate_args(args: argparse.Namespace, world_size: int) -> None:
    """Exit with one sentence on settings that cannot work, before any work starts."""
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
    for flag in ("log_every", "ckpt_every", "sample_steps"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"--{flag.replace('_', '-')} must be at least 1")


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


def create_experiment_dir(results_dir: str, model: str) -> str:
    """results_dir/NNN-<model>, NNN = the number of entries already in results_dir."""
    os.makedirs(results_dir, exist_ok=True)
    index = len(glob.glob(os.path.join(results_dir, "*")))
    experiment_dir = os.path.join(results_dir, f"{index:03d}-{experiment_name(model)}")
    os.makedirs(os.path.join(experiment_dir, "checkpoints"), exist_ok=True)
    return experiment_dir


def find_latest_checkpoint(results_dir: str, model: str) -> str | None:
    """The last checkpoint of the newest run of `model` in results_dir that has one."""

    def number(path: str) -> int:  # NNN of NNN-<model>, or the step of 0050000.pt
        return int(os.path.basename(path).split("-")[0].split(".")[0])

    runs = glob.glob(os.path.join(results_dir, f"[0-9][0-9][0-9]*-{experiment_name(model)}"))
    for run in sorted(runs, key=number, reverse=True):
        checkpoints = glob.glob(os.path.join(run, "checkpoints", "[0-9]*.pt"))
        if checkpoints:
            return max(checkpoints, key=number)
    return None


def check_resumable(checkpoint: dict, path: str, args: argparse.Namespace, world_size: int, dataset_size: int) -> None:
    missing = [key for key in RESUME_KEYS if key not in checkpoint]
    if missing:
        raise SystemExit(f"{path} is not a train.py checkpoint that can be resumed (it lacks {', '.join(missing)})")
    saved = checkpoint["args"]
    differences = [
        f"--{key.replace('_', '-')} {saved.get(key)} (now {getattr(args, key)})"
        for key in RESUME_MATCHING_ARGS
        if saved.get(key) != getattr(args, key)
    ]
    if checkpoint["world_size"] != world_size:
        differences.append(f"{checkpoint['world_size']} processes (now {world_size})")
    if checkpoint["dataset_size"] != dataset_size:
        differences.append(f"a dataset of {checkpoint['dataset_size']} images (now {dataset_size})")
    if differences:
        raise SystemExit(f"cannot resume from {path}: it was trained with {', '.join(differences)}; resume with the same settings")


def rng_states_of_all_ranks(device: torch.device) -> list[dict]:
    """Every process's torch RNG states (CPU, and CUDA on a GPU), in rank order."""
    state = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
    if not dist.is_initialized():
        return [state]
    states: list = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


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
# Training
# ----------------------------------------------------------------------------------------


class RunningStats:
    """Loss, skipped-image and skipped-step sums between log steps, kept on the devices until a log step."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss = torch.zeros((), device=self.device)
        self.skipped = torch.zeros(())
        self.skipped_steps = torch.zeros((), device=self.device)
        self.steps = 0
        self.start = time.time()

    def add(self, loss: torch.Tensor, skipped: torch.Tensor, skipped_step: torch.Tensor | None = None) -> None:
        self.loss += loss
        self.skipped += skipped.sum()
        if skipped_step is not None:
            self.skipped_steps += skipped_step
        self.steps += 1

    def reduce(self, world_size: int) -> tuple[float, int, int, float]:
        """Mean loss over steps and ranks, unreadable images met by all ranks, optimizer steps
        skipped by fp16 loss scaling (the same on every rank), steps/s; then reset."""
        means = all_reduce_mean(torch.stack([self.loss / self.steps, self.skipped.to(self.device), self.skipped_steps]))
        loss, skipped, skipped_steps = means[0].item(), round(means[1].item() * world_size), round(means[2].item())
        steps_per_sec = self.steps / (time.time() - self.start)
        self.reset()
        return loss, skipped, skipped_steps, steps_per_sec

    def loss_sum_is_finite(self) -> bool:
        """Whether every rank's losses since the last log step are finite (a collective call)."""
        return bool(all_reduce_mean(self.loss.clone()).isfinite())


def batch_to_device(batch: list, vae: torch.nn.Module | None, using_features: bool, device: torch.device):
    """A loader batch -> (latents, labels, number of unreadable images replaced)."""
    if using_features:
        mean, std, labels, skipped = batch
        latents = latents_from_features(mean.to(device, non_blocking=True), std.to(device, non_blocking=True))
    else:
        images, labels, skipped = batch
        latents = latents_from_images(vae, images.to(device, non_blocking=True))
    return latents, labels.to(device, non_blocking=True), skipped


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    info = setup_distributed()
    try:
        train(args, info)
    finally:
        cleanup_distributed()


def train(args: argparse.Namespace, info: DistInfo) -> None:
    device, rank, world_size = info.device, info.rank, info.world_size
    validate_args(args, world_size)
    per_rank_batch = args.global_batch_size // world_size
    args.precision, precision_note = setup_precision(args.precision, device)  # `auto` -> what it chose
    torch.manual_seed(args.global_seed * world_size + rank)
    dataset = open_dataset(args, per_rank_batch, world_size)

    resume_path = find_latest_checkpoint(args.results_dir, args.model) if args.resume == "auto" else args.resume
    checkpoint = None
    if resume_path is not None:
        try:
            checkpoint = load_checkpoint(resume_path, map_location="cpu")
        except ValueError as error:
            raise SystemExit(str(error)) from None
        check_resumable(checkpoint, resume_path, args, world_size, len(dataset))

    using_features = args.feature_path is not None
    needs_vae = not using_features or args.sample_every > 0
    try:
        vae = load_vae(args.vae, device if needs_vae else torch.device("cpu"), args.vae_path)
    except (FileNotFoundError, RuntimeError, ValueError) as error:  # load_vae's one-sentence errors
        raise SystemExit(str(error)) from None
    if using_features:
        check_feature_vae(args, dataset, vae)
        vae = vae if needs_vae else None

    experiment_dir = None
    if info.is_main:
        in_place = resume_path is not None and os.path.basename(os.path.dirname(resume_path)) == "checkpoints"
        if in_place:
            experiment_dir = os.path.dirname(os.path.dirname(os.path.abspath(resume_path)))
        else:
            experiment_dir = create_experiment_dir(args.results_dir, args.model)
    logger = create_logger(experiment_dir, rank)
    logger.info(f"experiment folder {experiment_dir}; {world_size} process(es) on {device}; arguments {vars(args)}")
    if precision_note:
        logger.info(precision_note)
    if args.resume == "auto" and resume_path is None:
        logger.info(f"--resume auto found no checkpoint of {args.model} in {args.results_dir}: starting a new run")

    model = DiT_models[args.model](
        input_size=args.image_size // 8, num_classes=args.num_classes, fused_attn=args.attention == "fused"
    ).to(device)
    ema = deepcopy(model).requires_grad_(False)
    optimizer = build_optimizer(model, args.lr)
    scaler = grad_scaler(args.precision, device)
    step = epoch = epoch_step = 0  # epoch_step: batches of `epoch` already trained on
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        ema.load_state_dict(checkpoint["ema"])
        optimizer.load_state_dict(checkpoint["opt"])
        for group in optimizer.param_groups:
            group["lr"] = args.lr
        if scaler.is_enabled() and checkpoint.get("scaler"):  # the loss scale of an fp16 run
            scaler.load_state_dict(checkpoint["scaler"])
        step, epoch, epoch_step = checkpoint["step"], checkpoint["epoch"], checkpoint["epoch_step"]
        logger.info(f"resuming from {resume_path} at step {step} (epoch {epoch}, batch {epoch_step} of the epoch)")
    model.set_grad_checkpointing(args.grad_checkpointing)
    model.train()
    ema.eval()
    train_model = DDP(model, device_ids=[device] if device.type == "cuda" else None) if dist.is_initialized() else model
    if args.compile:
        train_model = compile_for_training(train_model)
    diffusion = create_diffusion(timestep_respacing="")
    logger.info(f"{args.model}: {sum(p.numel() for p in model.parameters()):,} parameters")

    sampler = EpochSampler(len(dataset), rank, world_size, args.global_seed)
    steps_per_epoch = sampler.samples_per_rank // per_rank_batch
    loader = DataLoader(
        dataset,
        batch_size=per_rank_batch,
        sampler=sampler,
        num_workers=args.num_workers,
        pin_memory=device.type == "cuda",
        drop_last=True,
        persistent_workers=args.num_workers > 0,
        # A private generator: making loader iterators must not consume the global RNG.
        generator=torch.Generator().manual_seed(args.global_seed),
    )
    source = f"features in {args.feature_path}" if using_features else f"images in {args.data_path}"
    logger.info(f"{len(dataset):,} {source}; {steps_per_epoch} steps per epoch")

    def stop_on_divergence(first_step: int) -> None:
        where = f"at step {step}" if first_step >= step else f"between steps {first_step} and {step}"
        message = (
            f"the loss or the weights became non-finite {where}; stopping without saving "
            f"these weights (last good checkpoint: {last_checkpoint or 'none'})"
        )
        logger.error(message)
        raise SystemExit(message)

    def save() -> str:
        """Every rank checks the weights and hands in its RNG state; rank 0 writes the file."""
        if not (stats.loss_sum_is_finite() and parameters_are_finite(model)):
            stop_on_divergence(last_checked_step + 1)
        rng = rng_states_of_all_ranks(device)
        if not info.is_main:
            return ""
        path = os.path.join(experiment_dir, "checkpoints", f"{step:07d}.pt")
        state = {
            "model": model.state_dict(),
            "ema": ema.state_dict(),
            "opt": optimizer.state_dict(),
            "args": vars(args),
            "step": step,
            "epoch": epoch,
            "epoch_step": epoch_step,
            "world_size": world_size,
            "dataset_size": len(dataset),
            "rng": rng,
            "scaler": scaler.state_dict(),  # {} unless fp16
        }
        save_checkpoint(state, path)
        logger.info(f"saved checkpoint {path}")
        return path

    max_steps = args.max_steps if args.max_steps is not None else float("inf")
    last_checkpoint = resume_path
    last_checked_step = step  # losses and weights up to here are known to be finite
    last_saved_step = step if checkpoint is not None else None
    skipped_total = skipped_steps_total = 0
    grad_norm = None
    if checkpoint is not None:
        restore_rng_state(checkpoint["rng"], rank, device)  # last, after everything that draws numbers
        del checkpoint
    logger.info(f"training for {args.epochs} epochs" + (f" or {args.max_steps} steps" if args.max_steps else ""))
    stats = RunningStats(device)
    while epoch < args.epochs and step < max_steps:
        sampler.set_epoch(epoch, epoch_step * per_rank_batch)
        for batch in loader:
            latents, labels, skipped = batch_to_device(batch, vae, using_features, device)
            with_grad_norm = (step + 1) % args.log_every == 0
            loss, norm, skipped_step = training_step(
                train_model, diffusion, optimizer, latents, labels, args.precision, with_grad_norm, scaler
            )
            update_ema(ema, model, args.ema_decay)
            stats.add(loss, skipped, skipped_step)
            grad_norm = norm if norm is not None else grad_norm
            step += 1
            epoch_step += 1
            if epoch_step == steps_per_epoch:  # the loader drops the last partial batch
                epoch, epoch_step = epoch + 1, 0

            if step % args.log_every == 0:
                loss_value, skipped, skipped_steps, steps_per_sec = stats.reduce(world_size)
                if not math.isfinite(loss_value):
                    stop_on_divergence(last_checked_step + 1)
                last_checked_step = step
                skipped_total += skipped
                skipped_steps_total += skipped_steps
                record = {
                    "step": step,
                    "loss": loss_value,
                    "steps_per_sec": steps_per_sec,
                    "images_per_sec": steps_per_sec * args.global_batch_size,
                    "lr": optimizer.param_groups[0]["lr"],
                    "grad_norm": grad_norm.item(),
                    "peak_memory_mb": peak_memory_mb(device),
                    "skipped_images": skipped_total,
                }
                if scaler.is_enabled():  # fp16: steps the loss scaler skipped for inf/NaN gradients
                    record.update(skipped_steps=skipped_steps_total, loss_scale=scaler.get_scale())
                logger.info(
                    f"(step={step:07d}) train loss: {loss_value:.4f}, train steps/sec: {steps_per_sec:.2f}, "
                    f"grad norm: {record['grad_norm']:.3f}, peak memory: {record['peak_memory_mb']:.0f} MB"
                    + (f", unreadable images skipped so far: {skipped_total}" if skipped_total else "")
                    + (f", fp16 steps skipped so far: {skipped_steps_total}" if skipped_steps_total else "")
                )
                if info.is_main:
                    with open(os.path.join(experiment_dir, "metrics.jsonl"), "a") as f:
                        f.write(json.dumps(record) + "\n")

            if step % args.ckpt_every == 0:
                last_checkpoint = save()
                last_checked_step = last_saved_step = step

            if args.sample_every and step % args.sample_every == 0 and info.is_main:
                path = os.path.join(experiment_dir, "samples", f"{step:07d}.png")
                os.makedirs(os.path.dirname(path), exist_ok=True)
                save_grid(sample_images(ema, vae, args.sample_steps, args.num_classes, args.global_seed, args.precision), path)
                logger.info(f"saved samples {path}")

            if step >= max_steps:
                break

    if last_saved_step != step:
        save()
    logger.info(f"done after {step} steps")


if __name__ == "__main__":
    main()
