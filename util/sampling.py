"""What sample.py and sample_ddp.py share: a DiT loaded for sampling, the sampler, the guided loop.

Checkpoints without a null label (train.py --class-dropout-prob 0, e.g. unconditional training
with --num-classes 1) have a label table of --num-classes rows instead of --num-classes + 1.
load_model tells the two apart by that row count (and refuses a training checkpoint whose
stored --num-classes differs from the one passed). Such a model cannot be guided: classifier-
free guidance needs the null label's prediction (Section 3.1). So the scripts sample it without
guidance whatever --cfg-scale says, and print one line saying so when --cfg-scale is not 1;
refusing instead would make every command for such a checkpoint spell out --cfg-scale 1.
"""
from __future__ import annotations

import functools
import os
from typing import Callable, Sequence

import torch

from diffusion import NUM_TRAIN_STEPS, SpacedDiffusion, create_diffusion
from util.checkpoints import load_checkpoint, model_weights
from util.pretrained import PRETRAINED_MODELS, find_model
from models import DiT, DiT_models, check_state_dict
from util.precision import autocast
from diffusion.solvers import DEFAULT_SPACING, SOLVERS, Solver, make_scheduler
from util.vae import latent_size

# The reference's two loops, then diffusers' solvers (solvers.py).
SAMPLERS = ("ddpm", "ddim", *SOLVERS)
# Bad input surfaces as one of these while a script sets up; scripts print it as one line.
SETUP_ERRORS = (ValueError, OSError, RuntimeError)
LABEL_TABLE = "y_embedder.embedding_table.weight"


def check_labels(labels: Sequence[int], num_classes: int) -> None:
    """Check class labels on the host, before they reach an accelerator."""
    bad = [label for label in labels if not 0 <= label < num_classes]
    if bad:
        raise ValueError(f"class labels must lie in [0, {num_classes - 1}] for --num-classes {num_classes}, got {bad}")


def default_checkpoint(model_name: str, image_size: int) -> str:
    """The released checkpoint for this model and size; only DiT-XL/2 at 256 and 512 px has one."""
    name = f"DiT-XL-2-{image_size}x{image_size}.pt"
    if model_name != "DiT-XL/2" or name not in PRETRAINED_MODELS:
        raise ValueError(
            f"there is no released checkpoint for {model_name} at {image_size} px (only DiT-XL/2 at 256 "
            f"and 512 px); pass --ckpt PATH"
        )
    return name


def read_checkpoint(ckpt: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The weights to sample with and the training flags stored with them ({} when there are none)."""
    if ckpt in PRETRAINED_MODELS or not os.path.isfile(ckpt):
        return find_model(ckpt), {}
    checkpoint = load_checkpoint(ckpt)
    saved_args = checkpoint.get("args") if isinstance(checkpoint, dict) else None
    return model_weights(checkpoint), saved_args if isinstance(saved_args, dict) else {}


def checkpoint_has_null_label(state_dict: dict[str, torch.Tensor], saved_args: dict, num_classes: int, ckpt: str) -> bool:
    """Whether the label table has the null row: --num-classes + 1 rows with it, --num-classes
    without. A label table of any other size is left to check_state_dict to report."""
    saved_classes = saved_args.get("num_classes", num_classes)
    if saved_classes != num_classes:  # else N classes + null and N + 1 classes look alike
        raise ValueError(f"checkpoint {ckpt} was trained with --num-classes {saved_classes} (now {num_classes}); pass --num-classes {saved_classes}")
    table = state_dict.get(LABEL_TABLE) if isinstance(state_dict, dict) else None
    return not (isinstance(table, torch.Tensor) and table.ndim == 2 and table.shape[0] == num_classes)


def has_null_label(model: DiT) -> bool:
    """Whether the model has the null label that classifier-free guidance needs."""
    return model.y_embedder.embedding_table.num_embeddings > model.num_classes


def guidance_scale(model: DiT, cfg_scale: float) -> tuple[float, str | None]:
    """The guidance scale the model can take, and a line to print when it is not `cfg_scale`:
    a model without a null label samples unguided (scale 1)."""
    if has_null_label(model) or cfg_scale == 1.0:
        return cfg_scale, None
    return 1.0, f"--cfg-scale {cfg_scale}: guidance is off because the checkpoint has no null label (trained with --class-dropout-prob 0)"


def load_model(model_name: str, image_size: int, num_classes: int, ckpt: str | None, device: torch.device) -> DiT:
    """The DiT `model_name` with the weights of `ckpt` (default: the released one), in eval mode.

    The model is built on the meta device, so the weights are not initialised only to be
    overwritten; a checkpoint that does not fit fails naming the expected and found shapes.
    It has a null label exactly when the checkpoint has one.
    """
    if model_name not in DiT_models:
        raise ValueError(f"unknown model {model_name!r}; choose one of {', '.join(DiT_models)}")
    build = functools.partial(DiT_models[model_name], input_size=latent_size(image_size), num_classes=num_classes)
    with torch.device("meta"):
        model = build()  # a size that cannot work fails here, before a checkpoint is read or downloaded
    ckpt = ckpt or default_checkpoint(model_name, image_size)
    state_dict, saved_args = read_checkpoint(ckpt)
    if not checkpoint_has_null_label(state_dict, saved_args, num_classes, ckpt):
        with torch.device("meta"):
            model = build(class_dropout_prob=0.0)  # no label is dropped, so there is no null row
    check_state_dict(
        model, state_dict, what=f"checkpoint {ckpt} (for {model_name}, --image-size {image_size}, --num-classes {num_classes})"
    )
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.to(device=device, dtype=torch.float32).eval().requires_grad_(False)


def compile_for_sampling(model: DiT) -> DiT:
    """torch.compile the model in place (its guided forward too), with the weights frozen:
    inductor then treats them as constants it can fold and pre-pack.

    `freezing` is read while a graph is traced and compiled, which happens at calls (the
    first one and each new input shape), and a compile option reaches inductor but not the
    tracer, which then keeps the weights as inputs. So every call of the compiled model runs
    under `inductor_config.patch`, and nothing is changed for the rest of the process.
    """
    from torch._inductor import config as inductor_config

    model.requires_grad_(False).compile()
    model._compiled_call_impl = inductor_config.patch(freezing=True)(model._compiled_call_impl)
    return model


def create_sampler(num_steps: int, sampler: str, timestep_spacing: str = DEFAULT_SPACING) -> SpacedDiffusion | Solver:
    """DDPM over `num_steps` evenly spaced steps, DDIM over `num_steps` steps at an integer
    stride, or one of diffusers' solvers over `num_steps` steps placed by `timestep_spacing`."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if not 1 <= num_steps <= NUM_TRAIN_STEPS:
        raise ValueError(f"--num-sampling-steps must lie in [1, {NUM_TRAIN_STEPS}], got {num_steps}")
    if sampler in SOLVERS:
        return Solver(sampler, num_steps, make_scheduler(sampler, timestep_spacing))
    respacing = f"ddim{num_steps}" if sampler == "ddim" else str(num_steps)
    try:
        return create_diffusion(respacing)
    except ValueError as error:
        raise ValueError(f"--num-sampling-steps {num_steps} does not work with --sampler {sampler}: {error}") from error


def denoise(
    model: DiT,
    diffusion: SpacedDiffusion | Solver,
    z: torch.Tensor,
    y: torch.Tensor,
    cfg_scale: float | None,
    sampler: str = "ddpm",
    precision: str = "fp32",
    all_eps_channels: bool = False,
    noise_fn: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like,
    progress: bool = False,
) -> torch.Tensor:
    """Run the reverse process from starting latents z (N, C, L, L) with labels y (N,).

    With a cfg_scale the batch is [z; z] with labels [y; null] and the model's guided
    forward (DiT's classifier-free guidance); None samples without guidance. Returns the
    N final latents. The model runs under `precision`; the diffusion arithmetic stays fp32.
    A Solver (from create_sampler) integrates the N latents themselves and takes the
    guided noise prediction only: the variance channels play no part in an ODE.
    """
    if cfg_scale is None:
        x, labels, forward = z, y, model.forward
    elif not has_null_label(model):
        raise ValueError("this model has no null label (trained with --class-dropout-prob 0), so it cannot be guided; pass cfg_scale None")
    else:
        x = torch.cat([z, z])
        labels = torch.cat([y, torch.full_like(y, model.num_classes)])
        forward = functools.partial(model.forward_with_cfg, cfg_scale=cfg_scale, all_eps_channels=all_eps_channels)

    def model_fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with autocast(precision, x.device):
            return forward(x, t, y).float()

    if isinstance(diffusion, Solver):
        copies = len(x) // len(z)  # [x; x] with guidance

        def eps_fn(latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            out = model_fn(latents.repeat(copies, 1, 1, 1), t.repeat(copies), labels)
            return out[: len(latents), : model.in_channels]

        return diffusion.sample(eps_fn, z, noise_fn=noise_fn, progress=progress)

    loop = diffusion.ddim_sample_loop if sampler == "ddim" else diffusion.p_sample_loop
    samples = loop(
        model_fn, x.shape, x, clip_denoised=False, model_kwargs=dict(y=labels),
        progress=progress, device=x.device, noise_fn=noise_fn,
    )
    return samples[: len(z)]
