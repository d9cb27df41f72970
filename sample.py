"""Sample a grid of images from a DiT with classifier-free guidance.

  python sample.py --cfg-scale 4.0                                   # released DiT-XL/2 256 -> sample.png
  python sample.py --model DiT-S/2 --ckpt results/000-DiT-S-2/checkpoints/0400000.pt --class-labels 1 2 3

With the same checkpoint, VAE, seed and flags it draws the same starting latent as the
original sample.py on a GPU: the generator is re-seeded right before the latent is drawn.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from PIL import Image

from distributed import default_device
from images import save_grid
from models import DiT_models
from precision import PRECISIONS, configure_precision
from sampling import SAMPLERS, SETUP_ERRORS, check_labels, compile_for_sampling, create_sampler, denoise, load_model
from vae import HUB_VAES, decode, latent_size, load_vae

DEFAULT_LABELS = [207, 360, 387, 974, 88, 979, 417, 279]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Sample an image grid from a DiT.")
    parser.add_argument("--model", type=str, choices=list(DiT_models), default="DiT-XL/2")
    parser.add_argument("--vae", type=str, choices=list(HUB_VAES), default="mse")
    parser.add_argument("--vae-path", type=str, default=None, help="local diffusers AutoencoderKL folder (instead of the hub)")
    parser.add_argument("--image-size", type=int, default=256, help="a multiple of 8 whose latent the patch size divides")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--cfg-scale", type=float, default=4.0)
    parser.add_argument(
        "--cfg-all-eps-channels", action="store_true",
        help="guide all 4 noise channels (textbook CFG); by default only the first 3, as the original",
    )
    parser.add_argument("--num-sampling-steps", type=int, default=250)
    parser.add_argument("--sampler", type=str, choices=SAMPLERS, default="ddpm", help="ddim: eta 0, steps at an integer stride")
    parser.add_argument("--precision", type=str, choices=PRECISIONS, default="fp32")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (compiles for a minute first)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ckpt", type=str, default=None, help="checkpoint to sample from (default: the released DiT-XL/2)")
    parser.add_argument("--class-labels", type=int, nargs="+", default=DEFAULT_LABELS)
    parser.add_argument("--out", type=str, default="sample.png", help="image file to write the grid to")
    return parser.parse_args(argv)


def check_output_path(path: str) -> None:
    """Fail before sampling, not after, when the grid could not be written."""
    extension = os.path.splitext(path)[1].lower()
    if extension not in Image.registered_extensions():
        raise ValueError(f"--out {path} needs an image file extension such as .png")
    folder = os.path.dirname(path)
    if folder and not os.path.isdir(folder):
        raise FileNotFoundError(f"the folder of --out {path} does not exist")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = default_device()
    try:
        configure_precision(args.precision)
        check_labels(args.class_labels, args.num_classes)
        check_output_path(args.out)
        size = latent_size(args.image_size)
        model = load_model(args.model, args.image_size, args.num_classes, args.ckpt, device)
        if args.compile:
            compile_for_sampling(model)
        diffusion = create_sampler(args.num_sampling_steps, args.sampler)
        vae = load_vae(args.vae, device, args.vae_path)
    except SETUP_ERRORS as error:
        sys.exit(f"sample.py: error: {error}")

    # On a GPU the original draws the latent from a CUDA generator that nothing has used
    # since seeding; re-seeding here gives the same draws on any device.
    torch.manual_seed(args.seed)
    z = torch.randn(len(args.class_labels), 4, size, size, device=device)
    y = torch.tensor(args.class_labels, device=device)
    latents = denoise(
        model, diffusion, z, y, args.cfg_scale, sampler=args.sampler, precision=args.precision,
        all_eps_channels=args.cfg_all_eps_channels, progress=True,
    )
    save_grid(decode(vae, latents), args.out)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
