"""Command-line flag groups that several scripts share, each declared once.

The defaults that differ between scripts (the VAE, the precision, the guidance scale) are
the original scripts' own and are passed in by each script.
"""
from __future__ import annotations

import argparse
import math

from diffusion import NUM_TRAIN_STEPS
from models import DiT_models
from util.precision import PRECISIONS
from util.vae import HUB_VAES, PIXEL_SPACE


def make_parser(description: str) -> argparse.ArgumentParser:
    """A parser whose --help shows every flag's default."""
    return argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """--model, --image-size, --num-classes: which DiT, at which resolution, for how many classes."""
    parser.add_argument("--model", type=str, choices=list(DiT_models), default="DiT-XL/2", help="DiT config (paper Table 1)")
    parser.add_argument(
        "--image-size", type=int, default=256,
        help="image side in pixels: a multiple of 8 (the VAE's downsampling) whose latent the patch size divides",
    )
    parser.add_argument("--num-classes", type=int, default=1000, help="class labels 0..N-1 (plus the null label N for guidance, unless trained with --class-dropout-prob 0)")


def add_data_flags(parser: argparse.ArgumentParser, required: bool) -> None:
    """--data-path, --num-workers: the image folder and the processes that read it."""
    parser.add_argument(
        "--data-path", type=str, required=required, default=None,
        help="image folder: DIR/<class>/<image>, or DIR/<image> for one class",
    )
    parser.add_argument("--num-workers", type=int, default=4, help="data-loading worker processes per process")


def add_vae_flags(parser: argparse.ArgumentParser, default: str) -> None:
    """--vae, --vae-path: the space the DiT works in (paper Section 3.1: the SD VAE's latents)."""
    parser.add_argument(
        "--vae", type=str, choices=[*HUB_VAES, PIXEL_SPACE], default=default,
        help=f"ema/mse: the latents of stabilityai/sd-vae-ft-<vae> from the hub; {PIXEL_SPACE}: no autoencoder, "
        "the DiT works on RGB pixels in [-1, 1]",
    )
    parser.add_argument(
        "--vae-path", type=str, default=None,
        help="a local diffusers AutoencoderKL folder, any channels and down-sampling (its config's); wins over --vae",
    )


def vae_error_sentence(error: Exception, vae_path: str | None) -> str:
    """An AutoencoderError's sentence with the flag that fixes it: the folder's, or the folder to pass."""
    if vae_path is not None:
        return f"--vae-path {error}"
    return f"{error}: pass it with --vae-path DIR"


def add_precision_flag(parser: argparse.ArgumentParser, default: str | None) -> None:
    parser.add_argument(
        "--precision", type=str, choices=PRECISIONS, default=default,
        help="auto: bf16 where the device computes it natively, else tf32 on a GPU and fp32 on a CPU; "
        "tf32 is fp32 on a CPU; bf16/fp16 autocast keeps fp32 master weights",
    )


def add_compile_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (compiles for a minute or more first)")


def add_sampling_flags(parser: argparse.ArgumentParser, cfg_scale: float) -> None:
    """The checkpoint, the sampler and classifier-free guidance (paper Section 3.1)."""
    from util.sampling import SAMPLERS
    from diffusion.solvers import DEFAULT_SPACING, TIMESTEP_SPACINGS

    parser.add_argument(
        "--ckpt", type=str, default=None,
        help="checkpoint to sample from: a file, a diffusers DiT folder or hf:OWNER/REPO; None: the released DiT-XL/2",
    )
    parser.add_argument(
        "--cfg-scale", type=float, default=cfg_scale,
        help="guidance scale s; 1 turns guidance off, as does a checkpoint without a null label (--class-dropout-prob 0)",
    )
    parser.add_argument(
        "--cfg-all-eps-channels", action="store_true",
        help="guide all 4 noise channels (textbook CFG); by default only the first 3, as the original",
    )
    parser.add_argument(
        "--num-sampling-steps", type=int, default=250,
        help=f"sampler steps, 1 to {NUM_TRAIN_STEPS} (model calls: x2 with guidance; heun takes 2 per step but the last)",
    )
    parser.add_argument(
        "--sampler", type=str, choices=SAMPLERS, default="ddpm",
        help="ddpm: the reference's ancestral sampler; ddim: eta 0, steps at an integer stride; the others are "
        "diffusers' solvers (solvers.py): dpm-solver++ (2M), dpm-solver++-sde (2M SDE), unipc, euler, heun",
    )
    parser.add_argument(
        "--timestep-spacing", type=str, choices=TIMESTEP_SPACINGS, default=DEFAULT_SPACING,
        help="where diffusers' solvers place their steps (their timestep_spacing option; karras: use_karras_sigmas); "
        "ddpm and ddim ignore it",
    )


def check_sampling_flags(args: argparse.Namespace) -> None:
    """One sentence for a sampling flag that cannot work, before anything is loaded."""
    if not math.isfinite(args.cfg_scale):
        raise ValueError(f"--cfg-scale must be a finite number, got {args.cfg_scale}")
    if not 1 <= args.num_sampling_steps <= NUM_TRAIN_STEPS:
        raise ValueError(f"--num-sampling-steps must lie in [1, {NUM_TRAIN_STEPS}] (the training steps), got {args.num_sampling_steps}")
    if args.num_classes < 1:
        raise ValueError(f"--num-classes must be at least 1, got {args.num_classes}")
