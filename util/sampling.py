"""What sample.py and sample_ddp.py share: a DiT built for a checkpoint's weights, the sampler,
the guided loop.

Checkpoints without a null label (train.py with class dropout 0, e.g. unconditional training
with one class) have a label table of num_classes rows instead of num_classes + 1. A train.py
checkpoint says which through its saved `class_dropout_prob`; for any other source the row
count tells. Such a model cannot be guided: classifier-free guidance needs the null label's
prediction (Section 3.1), so `guidance_scale` turns guidance off for it.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Union

import torch

from diffusion import NUM_TRAIN_STEPS, SpacedDiffusion, create_diffusion
from diffusion.solvers import DEFAULT_SPACING, SOLVERS, Solver, make_scheduler
from models import DiT, DiT_models, check_state_dict
from util.checkpoints import WeightsError
from util.precision import autocast

# The reference's two loops, then diffusers' solvers (solvers.py).
SAMPLERS = ("ddpm", "ddim", *SOLVERS)
# Bad input surfaces as one of these while a script sets up; scripts print it as one line.
SETUP_ERRORS = (ValueError, OSError, RuntimeError)
LABEL_TABLE = "y_embedder.embedding_table.weight"
PATCH_WEIGHT = "x_embedder.proj.weight"


class SamplerError(ValueError):
    """A step count a sampler cannot take; `reason` says why."""

    def __init__(self, name: str, num_steps: int, reason: str):
        self.name, self.num_steps, self.reason = name, num_steps, reason
        super().__init__(f"{num_steps} steps do not work with the {name} sampler: {reason}")


@dataclass(frozen=True)
class DiffusionLoop:
    """The reference's loops over a respaced diffusion: DDPM's ancestral sampling (Ho et al.
    2020) or DDIM with eta 0 (Song et al. 2021), on the steps the diffusion was respaced to."""

    name: str  # "ddpm" or "ddim"
    diffusion: SpacedDiffusion

    def __post_init__(self) -> None:
        if self.name not in ("ddpm", "ddim"):
            raise SamplerError(self.name, len(self.diffusion.timestep_map), "the diffusion loops are ddpm and ddim")

    def run(self, model_fn: Callable, x: torch.Tensor, labels: torch.Tensor, noise_fn: Callable, progress: bool) -> torch.Tensor:
        loop = self.diffusion.ddim_sample_loop if self.name == "ddim" else self.diffusion.p_sample_loop
        return loop(
            model_fn, x.shape, x, clip_denoised=False, model_kwargs=dict(y=labels),
            progress=progress, device=x.device, noise_fn=noise_fn,
        )


# A sampler knows its kind: a diffusion loop, or a diffusers solver (solvers.py).
Sampler = Union[DiffusionLoop, Solver]


def create_sampler(num_steps: int, name: str, timestep_spacing: str = DEFAULT_SPACING) -> Sampler:
    """DDPM over `num_steps` evenly spaced steps, DDIM over `num_steps` steps at an integer
    stride, or one of diffusers' solvers over `num_steps` steps placed by `timestep_spacing`."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    if not 1 <= num_steps <= NUM_TRAIN_STEPS:
        raise SamplerError(name, num_steps, f"the step count must lie in [1, {NUM_TRAIN_STEPS}] (the training steps)")
    if name in SOLVERS:
        return Solver(name, num_steps, make_scheduler(name, timestep_spacing))
    try:
        return DiffusionLoop(name, create_diffusion(f"ddim{num_steps}" if name == "ddim" else str(num_steps)))
    except ValueError as error:
        raise SamplerError(name, num_steps, str(error)) from error


# ---------------------------------------------------------------- weights -> model

@functools.cache
def model_shapes() -> dict[tuple[int, int, int], str]:
    """(depth, hidden size, patch size) -> the DiT_models name (paper Table 1)."""
    shapes = {}
    for name, build in DiT_models.items():
        with torch.device("meta"):
            model = build(input_size=32)
        shapes[(len(model.blocks), model.x_embedder.proj.out_channels, model.patch_size)] = name
    return shapes


def describe_state_dict(state_dict: dict[str, torch.Tensor]) -> str:
    """What a DiT state dict was made for, read off its shapes, e.g. "DiT-S/8 at 32x32 latents,
    4 channels, 1001 label rows (1000 classes and the null label)"; "not a DiT state dict" when
    it lacks the tensors that tell."""
    try:
        hidden, in_channels, patch, _ = state_dict[PATCH_WEIGHT].shape
        tokens, rows = state_dict["pos_embed"].shape[1], state_dict[LABEL_TABLE].shape[0]
        depth = 1 + max(int(key.split(".")[1]) for key in state_dict if key.startswith("blocks."))
    except (KeyError, ValueError, AttributeError, IndexError):
        return "not a DiT state dict"
    name = model_shapes().get((depth, hidden, patch), f"a DiT of depth {depth}, width {hidden}, patch {patch}")
    side = math.isqrt(tokens) * patch
    space = "pixels" if in_channels == 3 else "latents"
    classes = "1 label row (1 class, no null label)" if rows == 1 else f"{rows} label rows ({rows - 1} classes and the null label, or {rows} without)"
    return f"{name} at {side}x{side} {space}, {in_channels} channels, {classes}"


def has_null_row(state_dict: dict[str, torch.Tensor], num_classes: int) -> bool:
    """Whether the label table has the null row: num_classes + 1 rows with it, num_classes
    without. A table of any other size is left to the shape check to report."""
    table = state_dict.get(LABEL_TABLE)
    return not (isinstance(table, torch.Tensor) and table.ndim == 2 and table.shape[0] == num_classes)


def build_model(
    state_dict: dict[str, torch.Tensor],
    model_name: str,
    input_size: int,
    num_classes: int,
    in_channels: int = 4,
    null_label: bool | None = None,
    source: str = "the checkpoint",
) -> DiT:
    """The DiT `model_name` for (in_channels, input_size, input_size) inputs with `state_dict`
    loaded, in eval mode, fp32, on the CPU. `null_label` None: as the label table's rows say.

    The model is built on the meta device, so the weights are not initialised only to be
    overwritten. Weights made for another config raise WeightsError naming that config and
    the first shape that differs.
    """
    if model_name not in DiT_models:
        raise WeightsError(f"unknown model {model_name!r}; choose one of {', '.join(DiT_models)}")
    null_label = has_null_row(state_dict, num_classes) if null_label is None else null_label
    with torch.device("meta"):
        model = DiT_models[model_name](
            input_size=input_size, in_channels=in_channels, num_classes=num_classes, class_dropout_prob=0.1 if null_label else 0.0
        )
    try:
        check_state_dict(model, state_dict, what=source)
    except ValueError as error:
        wanted = f"{model_name} at {input_size}x{input_size}, {in_channels} channels, {num_classes} classes"
        raise WeightsError(f"{source} holds {describe_state_dict(state_dict)}, not {wanted} ({first_problem(error)})") from error
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.float().eval().requires_grad_(False)


def first_problem(error: ValueError) -> str:
    """The first difference check_state_dict names, e.g. "pos_embed expected (1, 4, 384) found (1, 1, 384)"."""
    detail = str(error).split("does not fit the model: ", 1)[-1]
    return detail.split(" | ")[0].split("; ")[0]


def has_null_label(model: DiT) -> bool:
    """Whether the model has the null label that classifier-free guidance needs."""
    return model.y_embedder.embedding_table.num_embeddings > model.num_classes


def guidance_scale(model: DiT, cfg_scale: float) -> float:
    """The guidance scale the model can take: a model without a null label samples unguided (1)."""
    return cfg_scale if has_null_label(model) else 1.0


def compile_for_sampling(model: DiT) -> DiT:
    """torch.compile the model's forward (so its guided forward too, which calls the model),
    with the weights frozen: inductor then treats them as constants it can fold and pre-pack.

    `freezing` is read while a graph is traced and compiled, which happens at calls (the
    first one and each new input shape), and a compile option reaches inductor but not the
    tracer, which then keeps the weights as inputs. So every call of the compiled forward runs
    under `inductor_config.patch`, and nothing is changed for the rest of the process.
    """
    from torch._inductor import config as inductor_config

    model.requires_grad_(False)
    model.forward = inductor_config.patch(freezing=True)(torch.compile(model.forward))
    return model


def denoise(
    model: DiT,
    sampler: Sampler,
    z: torch.Tensor,
    y: torch.Tensor,
    cfg_scale: float | None,
    precision: str = "fp32",
    all_eps_channels: bool = False,
    noise_fn: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like,
    progress: bool = False,
) -> torch.Tensor:
    """Run the reverse process of `sampler` (from create_sampler) from starting latents z
    (N, C, L, L) with labels y (N,).

    With a cfg_scale the batch is [z; z] with labels [y; null] and the model's guided
    forward (DiT's classifier-free guidance); None samples without guidance. Returns the
    N final latents. The model runs under `precision`; the diffusion arithmetic stays fp32.
    A Solver integrates the N latents themselves and takes the guided noise prediction only:
    the variance channels play no part in an ODE.
    """
    if cfg_scale is None:
        x, labels, forward = z, y, model.forward
    elif not has_null_label(model):
        raise ValueError("this model has no null label (trained without class dropout), so it cannot be guided; pass cfg_scale None")
    else:
        x = torch.cat([z, z])
        labels = torch.cat([y, torch.full_like(y, model.num_classes)])
        forward = functools.partial(model.forward_with_cfg, cfg_scale=cfg_scale, all_eps_channels=all_eps_channels)

    def model_fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with autocast(precision, x.device):
            return forward(x, t, y).float()

    if isinstance(sampler, Solver):
        copies = len(x) // len(z)  # [x; x] with guidance

        def eps_fn(latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            out = model_fn(latents.repeat(copies, 1, 1, 1), t.repeat(copies), labels)
            return out[: len(latents), : model.in_channels]

        return sampler.sample(eps_fn, z, noise_fn=noise_fn, progress=progress)
    return sampler.run(model_fn, x, labels, noise_fn, progress)[: len(z)]
