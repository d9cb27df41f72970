"""Sample a grid of images from a DiT with classifier-free guidance.

  python sample.py --cfg-scale 4.0                                   # released DiT-XL/2 256 -> sample.png
  python sample.py --ckpt results/000-DiT-S-2/checkpoints/0400000.pt --class-labels 1 2 3  # model, size, classes, VAE: the checkpoint's
  python sample.py --sampler dpm-solver++ --num-sampling-steps 25                # DPM-Solver++(2M), 25 steps
  python sample.py --ckpt CKPT --weights raw                          # a train.py checkpoint's raw (non-EMA) weights
  python sample.py --model DiT-S/2 --ckpt WEIGHTS.pt --num-classes 1 --class-labels 0 0 0 0  # bare weights: name the model

With the same checkpoint, VAE, seed and flags it draws the same starting latent as the
original sample.py on a GPU: the generator is re-seeded right before the latent is drawn.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from PIL import Image

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
from util.distributed import default_device
from util.images import save_grid
from util.precision import setup_precision
from util.sampling import SETUP_ERRORS, compile_for_sampling, denoise, guidance_scale, has_null_label

# The original's grid of ImageNet classes; a checkpoint with fewer classes gets 0, 1, 2, ... instead.
IMAGENET_LABELS = [207, 360, 387, 974, 88, 979, 417, 279]
GRID_SIZE = len(IMAGENET_LABELS)


def default_labels(num_classes: int) -> list[int]:
    """The original's ImageNet grid when the model has those classes, else its classes in turn (8 images)."""
    if max(IMAGENET_LABELS) < num_classes:
        return IMAGENET_LABELS
    return [label % num_classes for label in range(GRID_SIZE)]


def check_labels(labels: list[int], num_classes: int) -> None:
    """Check class labels on the host, before they reach an accelerator."""
    bad = [label for label in labels if not 0 <= label < num_classes]
    if bad:
        raise ValueError(f"class labels must lie in [0, {num_classes - 1}] for --num-classes {num_classes}, got {bad}")


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, set[str]]:
    """The flags, and which of CHECKPOINT_FLAGS and --class-labels the command line gave."""
    parser = make_parser("Sample an image grid from a DiT.")
    add_model_flags(parser)
    add_vae_flags(parser, default="mse")
    add_sampling_flags(parser, cfg_scale=4.0)
    add_precision_flag(parser, default="fp32")
    add_compile_flag(parser)
    parser.add_argument("--seed", type=int, default=0, help="seeds the starting latent and the sampler's noise")
    parser.add_argument(
        "--class-labels", type=int, nargs="+", default=IMAGENET_LABELS,
        help="one image per label, in grid order; for a model of fewer classes: 0, 1, ... (8 images)",
    )
    parser.add_argument("--out", type=str, default="sample.png", help="image file to write the grid to")
    return parser.parse_args(argv), given_flags(parser, argv, (*CHECKPOINT_FLAGS, "class_labels"))


def check_output_path(path: str) -> None:
    """Fail before sampling, not after, when the grid could not be written."""
    extension = os.path.splitext(path)[1].lower()
    if extension not in Image.registered_extensions():
        raise ValueError(f"--out {path} needs an image file extension such as .png")
    if os.path.isdir(path):
        raise IsADirectoryError(f"--out {path} is a folder; pass a file name such as {os.path.join(path, 'sample.png')}")
    folder = os.path.dirname(path) or "."
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise NotADirectoryError(f"--out {path} cannot be written: {folder} is a file, not a folder")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"the folder of --out {path} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"the folder of --out {path} is not writable")


def main(argv: list[str] | None = None) -> None:
    args, given = parse_args(argv)
    torch.manual_seed(args.seed)
    device = default_device()
    try:
        precision, message = setup_precision(args.precision, device)
        if message:
            print(message, file=sys.stderr)
        check_sampling_flags(args)
        check_output_path(args.out)
        sampler = sampler_from_flags(args)
        model, autoencoder = load_model(args, given, device)
        if "class_labels" not in given:
            args.class_labels = default_labels(args.num_classes)
        check_labels(args.class_labels, args.num_classes)
        message = guidance_note(model, args.cfg_scale)
        if message:
            print(message, file=sys.stderr)
        args.cfg_scale = guidance_scale(model, args.cfg_scale)
        if args.compile:
            compile_for_sampling(model)
    except SETUP_ERRORS as error:
        sys.exit(f"sample.py: error: {error}")

    # On a GPU the original draws the latent from a CUDA generator that nothing has used
    # since seeding; re-seeding here gives the same draws on any device.
    torch.manual_seed(args.seed)
    z = torch.randn(len(args.class_labels), model.in_channels, model.input_size, model.input_size, device=device)
    y = torch.tensor(args.class_labels, device=device)
    # The original guides at every scale, 1 included; a model without a null label cannot be guided.
    cfg_scale = args.cfg_scale if has_null_label(model) else None
    latents = denoise(
        model, sampler, z, y, cfg_scale, precision=precision, all_eps_channels=args.cfg_all_eps_channels, progress=True,
    )
    save_grid(autoencoder.decode(latents), args.out)  # pixel space: the model's output itself
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
