"""The building blocks of a training step: optimizer, EMA, latents, one (accumulated) step,
and the running statistics that the log lines report."""
from __future__ import annotations

import argparse
import math
import resource
import time
from collections.abc import Iterable
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from diffusion import SpacedDiffusion
from util.distributed import all_reduce_mean
from util.precision import autocast, grad_scaler
from models import DiT
from util.vae import SD_VAE_DESCRIPTION, Autoencoder


def build_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.AdamW:
    """AdamW with a constant learning rate and no weight decay (paper Section 4: lr 1e-4),
    betas (0.9, 0.999), as one fused kernel (CUDA and CPU alike)."""
    # All parameters, as the reference passes them (the frozen pos_embed never gets a gradient),
    # so that optimizer state dicts index parameters alike.
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0, fused=True)


def compile_for_training(model: torch.nn.Module) -> torch.nn.Module:
    """torch.compile, with random draws kept eager: compiled graphs would otherwise draw the
    label dropout from inductor's own generator, and differ from an eager run. The setting
    is passed to this compilation alone, never set globally."""
    return torch.compile(model, options={"fallback_random": True})


def wrap_for_training(model: DiT, args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    """The model in training mode, in DDP under torchrun, compiled when asked."""
    model.set_grad_checkpointing(args.grad_checkpointing)
    model.train()
    wrapped = DDP(model, device_ids=[device] if device.type == "cuda" else None) if dist.is_initialized() else model
    return compile_for_training(wrapped) if args.compile else wrapped


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema = decay * ema + (1 - decay) * model, over all parameters in two vectorised calls
    (paper Section 4: an EMA of the weights with decay 0.9999 is what sampling uses)."""
    ema_params = list(ema.parameters())
    torch._foreach_mul_(ema_params, decay)
    torch._foreach_add_(ema_params, [p.detach() for p in model.parameters()], alpha=1 - decay)


def ema_decay_at(decay: float, updates: int, warmup: bool) -> float:
    """The EMA decay for the update after `updates` earlier ones: `decay`, or with warm-up
    min(decay, (1 + t) / (10 + t)), the schedule of TensorFlow's ExponentialMovingAverage with
    num_updates, so that a short run's EMA is not still mostly its initial weights."""
    return min(decay, (1 + updates) / (10 + updates)) if warmup else decay


def ema_initial_share(decay: float, updates: int, warmup: bool) -> float:
    """The weight the EMA still gives to the weights it started from after `updates` updates:
    the product of the decays, decay ** updates without warm-up. The warm-up decays telescope:
    the first k of them multiply to 9! k! / (k + 9)! = 1 / C(k + 9, 9)."""
    if not warmup:
        return decay**updates
    # (1 + t) / (10 + t) < decay exactly when t < (10 decay - 1) / (1 - decay).
    warm = updates if decay >= 1 else min(updates, max(0, math.ceil((10 * decay - 1) / (1 - decay))))
    return decay ** (updates - warm) / math.comb(warm + 9, 9)


def latents_from_images(autoencoder: Autoencoder, images: torch.Tensor) -> torch.Tensor:
    """Scaled latents: one sample of the VAE posterior of each image (the images themselves in
    pixel space).

    Made contiguous because CPU convolutions may return channels-last tensors, and the
    diffusion's randn_like(latents) fills memory in order: the noise a step draws must not
    depend on the convolution backend (or differ between images and features).
    """
    return autoencoder.encode(images).contiguous()


def latents_from_features(mean: torch.Tensor, std: torch.Tensor, autoencoder: Autoencoder | None = None) -> torch.Tensor:
    """Scaled latents from a stored posterior: (mean + std * eps - shift) * scale with the store's
    autoencoder (the SD VAE's 0.18215 and no shift unless given), eps ~ N(0, I) from the global
    generator, drawn exactly as the VAE's own posterior sample draws it."""
    return (autoencoder or Autoencoder.from_description(SD_VAE_DESCRIPTION)).from_moments(mean, std)


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


def tensors_are_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether no floating-point tensor of `tensors` holds a NaN or an inf."""
    return all(bool(tensor.isfinite().all()) for tensor in tensors if tensor.is_floating_point())


def non_finite_parts(model: torch.nn.Module, ema: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Which of the weights, the EMA weights and the optimizer state (AdamW's moments) hold a NaN
    or an inf: a checkpoint of any of them would carry it into every run resumed from it."""
    moments = [value for state in optimizer.state.values() for value in state.values() if isinstance(value, torch.Tensor)]
    parts = {"the weights": model.parameters(), "the EMA weights": ema.state_dict().values(), "the optimizer state": moments}
    return [name for name, tensors in parts.items() if not tensors_are_finite(tensors)]


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated by tensors, or on a CPU the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux reports KiB


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
