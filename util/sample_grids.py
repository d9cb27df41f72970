"""The sample grids a training run saves: a few EMA samples with classifier-free guidance,
from the same noise and labels at every step, so that grids are comparable over training."""
from __future__ import annotations

import logging
import os

import torch
from torchvision.utils import make_grid

from diffusion import create_diffusion
from models import DiT
from util.images import save_grid
from util.run_state import Run
from util.sampling import denoise
from util.vae import Autoencoder

SAMPLE_COUNT = 8
SAMPLE_CFG_SCALE = 4.0

logger = logging.getLogger("dit")


@torch.no_grad()
def sample_images(
    ema: DiT,
    autoencoder: Autoencoder,
    num_sampling_steps: int,
    num_classes: int,
    seed: int,
    precision: str = "fp32",
) -> torch.Tensor:
    """SAMPLE_COUNT EMA samples with guidance SAMPLE_CFG_SCALE (none for a model without a null
    label), as images in [-1, 1] (decoded by the autoencoder).

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
    cfg_scale = SAMPLE_CFG_SCALE if ema.y_embedder.dropout_prob > 0 else None
    latents = denoise(ema, diffusion, z, y, cfg_scale, precision=precision, noise_fn=noise_fn)
    return autoencoder.decode(latents)


def save_samples(run: Run, autoencoder: Autoencoder, step: int) -> None:
    """Rank 0 saves a grid of EMA samples, the same noise and labels at every step."""
    if not run.info.is_main:
        return
    path = os.path.join(run.experiment_dir, "samples", f"{step:07d}.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    args = run.args
    samples = sample_images(run.ema, autoencoder, args.sample_steps, args.num_classes, args.global_seed, args.precision)
    save_grid(samples, path)
    logger.info(f"saved samples {path}")
    if run.tensorboard is not None:  # the same grid as the PNG
        run.tensorboard.add_image("samples", make_grid(samples, nrow=4, normalize=True, value_range=(-1, 1)), step)
