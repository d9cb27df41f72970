"""Command-line flag groups that several scripts share, each declared once, and the sampling
scripts' model: the flags a train.py checkpoint already holds need not be repeated.

The defaults that differ between scripts (the VAE, the precision, the guidance scale) are
the original scripts' own and are passed in by each script.
"""
from __future__ import annotations

import argparse
import math
from typing import Sequence

import torch

from diffusion import NUM_TRAIN_STEPS
from models import DiT, DiT_models
from util.checkpoints import WeightsError
from util.precision import PRECISIONS
from util.pretrained import PRETRAINED_MODELS, WEIGHT_SETS, load_weights
from util.sampling import SAMPLERS, SamplerError, build_model, create_sampler
from util.vae import HUB_VAES, PIXEL_SPACE, Autoencoder, AutoencoderError, load_autoencoder, read_autoencoder

# train.py flags (its checkpoint's `args`) that say which model to build and what it samples into.
CHECKPOINT_FLAGS = ("model", "image_size", "num_classes", "vae", "vae_path")
# Flags that must agree with the checkpoint when given: they decide the model's shapes.
SHAPE_FLAGS = ("model", "image_size", "num_classes")


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
    from diffusion.solvers import DEFAULT_SPACING, TIMESTEP_SPACINGS

    parser.add_argument(
        "--ckpt", type=str, default=None,
        help="checkpoint to sample from: a file, a diffusers DiT folder or hf:OWNER/REPO; None: the released DiT-XL/2. "
        "A train.py checkpoint supplies --model, --image-size, --num-classes, --vae and --vae-path unless they are given",
    )
    parser.add_argument(
        "--weights", type=str, choices=WEIGHT_SETS, default="ema",
        help="a train.py checkpoint's EMA weights (as the paper samples) or its raw trained weights",
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


def sampler_from_flags(args: argparse.Namespace) -> object:
    """create_sampler for --num-sampling-steps, --sampler and --timestep-spacing."""
    try:
        return create_sampler(args.num_sampling_steps, args.sampler, args.timestep_spacing)
    except SamplerError as error:
        raise ValueError(f"--num-sampling-steps {error.num_steps} does not work with --sampler {error.name}: {error.reason}") from error


def given_flags(parser: argparse.ArgumentParser, argv: Sequence[str] | None, dests: Sequence[str]) -> set[str]:
    """Which of `dests` the command line gives: parsed once more with a marker as their defaults."""
    defaults, unset = {dest: parser.get_default(dest) for dest in dests}, object()
    parser.set_defaults(**{dest: unset for dest in dests})
    try:
        parsed = vars(parser.parse_args(argv))
    finally:
        parser.set_defaults(**defaults)
    return {dest for dest in dests if parsed[dest] is not unset}


def flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def fill_from_checkpoint(args: argparse.Namespace, given: set[str], saved: dict) -> str | None:
    """Set the CHECKPOINT_FLAGS not given to the checkpoint's values (--vae and --vae-path as a
    pair); returns one sentence for the first given flag that contradicts the checkpoint."""
    source = "vae" not in given and "vae_path" not in given
    for key in CHECKPOINT_FLAGS:
        if key in saved and (key not in given if key in SHAPE_FLAGS else source):
            setattr(args, key, saved[key])
    pixels_differ = "vae" in given and "vae" in saved and (args.vae == PIXEL_SPACE) != (saved["vae"] == PIXEL_SPACE)
    for key in (*SHAPE_FLAGS, *(["vae"] if pixels_differ else [])):
        if key in given and key in saved and saved[key] != getattr(args, key):
            return (
                f"checkpoint {args.ckpt} was trained with {flag(key)} {saved[key]} (now {getattr(args, key)}); pass "
                f"{flag(key)} {saved[key]} or drop the flag, or pass a checkpoint trained with {flag(key)} {getattr(args, key)}"
            )
    return None


def default_checkpoint(model_name: str, image_size: int) -> str:
    """The released checkpoint for this model and size; only DiT-XL/2 at 256 and 512 px has one."""
    name = f"DiT-XL-2-{image_size}x{image_size}.pt"
    if model_name != "DiT-XL/2" or name not in PRETRAINED_MODELS:
        raise ValueError(
            f"there is no released checkpoint for {model_name} at {image_size} px (only DiT-XL/2 at 256 and 512 px); pass --ckpt PATH"
        )
    return name


def autoencoder_from_flags(args: argparse.Namespace, device: torch.device | None = None) -> tuple[Autoencoder, int]:
    """The autoencoder of --vae / --vae-path and the latent side of --image-size in it; without
    a device, its numbers from the config alone (no weights read)."""
    try:
        if device is None:
            autoencoder = read_autoencoder(args.vae, args.vae_path)
        else:
            autoencoder = load_autoencoder(args.vae, device, args.vae_path)
    except AutoencoderError as error:
        raise ValueError(vae_error_sentence(error, args.vae_path)) from error
    try:
        return autoencoder, autoencoder.latent_size(args.image_size)
    except AutoencoderError as error:
        raise ValueError(f"--image-size {error}") from error


def load_model(args: argparse.Namespace, given: set[str], device: torch.device) -> tuple[DiT, Autoencoder]:
    """The DiT of --ckpt (default: the released one) with its --weights, in eval mode on `device`,
    and the autoencoder its samples are decoded with.

    A train.py checkpoint fills the CHECKPOINT_FLAGS not given (in `args`) and decides whether
    there is a null label; any other source keeps the flags and its label table's rows decide.
    The DiT's channels and input size are the autoencoder's (3 and the image size in pixel
    space). Fails with one sentence naming the flag for every problem.
    """
    args.ckpt = args.ckpt or default_checkpoint(args.model, args.image_size)
    try:
        weights = load_weights(args.ckpt)
    except WeightsError as error:
        raise ValueError(error.with_flag("--ckpt PATH")) from error
    if args.weights == "raw" and weights.raw is None:
        raise ValueError(f"--weights raw: {args.ckpt} holds one set of weights, not a train.py checkpoint's raw and EMA copies; drop --weights raw")
    check_weights_are_finite(weights.select(args.weights), f"the {args.weights} weights of {args.ckpt}")
    contradiction = fill_from_checkpoint(args, given, weights.args)
    autoencoder, size = autoencoder_from_flags(args, device)
    dropout = weights.args.get("class_dropout_prob")
    try:
        model = build_model(
            weights.select(args.weights), args.model, size, args.num_classes, in_channels=autoencoder.channels,
            null_label=None if dropout is None else dropout > 0, source=f"checkpoint {args.ckpt}",
        )
    except ValueError as error:  # weights for another config, or a size the model cannot take
        raise ValueError(f"{contradiction} ({error})" if contradiction else str(error)) from error
    if contradiction:
        raise ValueError(contradiction)
    return model.to(device), autoencoder


def check_weights_are_finite(state_dict: dict[str, torch.Tensor], what: str) -> None:
    """One sentence when weights hold NaN or inf (they would sample black or noise images): a
    checkpoint without a checksum, written by other code, can carry them."""
    bad = {name: int((~tensor.isfinite()).sum()) for name, tensor in state_dict.items() if tensor.is_floating_point()}
    bad = {name: count for name, count in bad.items() if count}
    if bad:
        first = next(iter(bad))
        raise ValueError(
            f"{what} hold {sum(bad.values()):,} NaN or inf value(s) in {len(bad)} tensor(s) (the first: {first}), "
            f"so every sample would be garbage; pass --ckpt PATH to other weights"
        )


def guidance_note(model: DiT, cfg_scale: float) -> str | None:
    """The line to print when a model without a null label turns guidance off."""
    if cfg_scale == 1.0 or model.y_embedder.embedding_table.num_embeddings > model.num_classes:
        return None
    return f"--cfg-scale {cfg_scale}: guidance is off because the checkpoint has no null label (trained with --class-dropout-prob 0)"
