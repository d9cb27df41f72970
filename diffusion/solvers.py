"""Fast samplers: diffusers' multistep solvers driving this project's DiT.

The solvers integrate the probability-flow ODE (or, for the SDE variant, the reverse SDE) of
DiT's own training process: linear betas 1e-4 to 0.02 over 1000 steps, epsilon prediction
(paper Section 3.2). The model is always this project's DiT; diffusers' DiT transformer
embeds timesteps differently (see diffusers_format.py) and is never used.

  dpm-solver++      DPM-Solver++(2M), Lu et al. 2022, arXiv:2211.01095 (multistep, 2nd order)
  dpm-solver++-sde  SDE-DPM-Solver++(2M), same paper; draws noise at every step
  unipc             UniPC-2 (bh2), Zhao et al. 2023, arXiv:2302.04867 (predictor-corrector)
  euler             Euler on the sigma-parametrised ODE, Karras et al. 2022 (EDM)
  heun              Heun (2nd order) on the same ODE; 2 model calls per step but the last

A learned-variance DiT's extra output channels (the variance) are dropped: an ODE solver
only needs the noise prediction.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    SchedulerMixin,
    UniPCMultistepScheduler,
)
from tqdm.auto import tqdm

from . import NUM_TRAIN_STEPS
from . import gaussian_diffusion as gd

SOLVERS: dict[str, tuple[type[SchedulerMixin], dict]] = {
    "dpm-solver++": (DPMSolverMultistepScheduler, dict(algorithm_type="dpmsolver++", solver_order=2)),
    "dpm-solver++-sde": (DPMSolverMultistepScheduler, dict(algorithm_type="sde-dpmsolver++", solver_order=2)),
    "unipc": (UniPCMultistepScheduler, dict(solver_order=2, solver_type="bh2")),
    "euler": (EulerDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
}
# Solvers that draw noise at each step; it comes from the caller's noise_fn.
STOCHASTIC = frozenset({"dpm-solver++-sde"})
# diffusers' timestep_spacing values (Lin et al. 2023, Table 2), plus `karras`: the sigmas of
# Karras et al. 2022, Eq. 5 (rho 7), through the solvers' use_karras_sigmas option.
TIMESTEP_SPACINGS = ("trailing", "linspace", "leading", "karras")
# trailing starts at t = T-1, where training put pure noise, for any step count.
DEFAULT_SPACING = "trailing"


def make_scheduler(name: str, timestep_spacing: str = DEFAULT_SPACING, **options) -> SchedulerMixin:
    """diffusers' scheduler for solver `name`, set up with DiT's training schedule."""
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; choose one of {', '.join(SOLVERS)}")
    if timestep_spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"unknown --timestep-spacing {timestep_spacing!r}; choose one of {', '.join(TIMESTEP_SPACINGS)}")
    scheduler_class, defaults = SOLVERS[name]
    spacing = dict(use_karras_sigmas=True) if timestep_spacing == "karras" else dict(timestep_spacing=timestep_spacing)
    return scheduler_class(
        num_train_timesteps=NUM_TRAIN_STEPS,
        trained_betas=gd.get_named_beta_schedule("linear", NUM_TRAIN_STEPS),  # the betas DiT was trained with
        prediction_type="epsilon",
        **spacing,
        **{**defaults, **options},
    )


@dataclass
class Solver:
    """A diffusers scheduler and the number of steps to take with it."""

    name: str
    num_steps: int
    scheduler: SchedulerMixin

    @torch.no_grad()
    def sample(
        self,
        eps_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        z: torch.Tensor,
        noise_fn: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like,
        progress: bool = False,
    ) -> torch.Tensor:
        """Integrate from the standard-normal latents z to x_0. eps_fn(x, t) predicts the noise
        of x at the (N,) timesteps t; noise_fn(x) gives the stochastic solvers their noise."""
        scheduler = self.scheduler
        scheduler.set_timesteps(self.num_steps, device=z.device)  # also clears the multistep history
        x = z * scheduler.init_noise_sigma  # the sigma-parametrised solvers start at sigma_max
        for t in tqdm(scheduler.timesteps, disable=not progress):
            eps = eps_fn(scheduler.scale_model_input(x, t), t.expand(len(x)))
            noise = dict(variance_noise=noise_fn(x)) if self.name in STOCHASTIC else {}
            x = scheduler.step(eps, t, x, **noise).prev_sample
        return x

