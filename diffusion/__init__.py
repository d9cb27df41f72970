"""Improved-DDPM Gaussian diffusion, configured as DiT uses it: `create_diffusion(...)`."""
from __future__ import annotations

# T, the number of diffusion steps DiT is trained with (paper Section 2, as in ADM); samplers take 1 to T.
NUM_TRAIN_STEPS = 1000

from . import gaussian_diffusion as gd  # noqa: E402
from .respace import SpacedDiffusion, space_timesteps


def create_diffusion(
    timestep_respacing: str | list[int] | None,
    noise_schedule: str = "linear",
    use_kl: bool = False,
    sigma_small: bool = False,
    predict_xstart: bool = False,
    learn_sigma: bool = True,
    rescale_learned_sigmas: bool = False,
    diffusion_steps: int = NUM_TRAIN_STEPS,
) -> SpacedDiffusion:
    """A diffusion process over `diffusion_steps` steps, sampled on the kept subset.

    timestep_respacing: "" or None keeps every step (training); "250" keeps 250 evenly
    spaced steps; "10,15,20" spaces per section; "ddim50" keeps 50 steps at an integer stride.
    The defaults give DiT's setting: linear schedule, eps prediction, learned variance
    range and the hybrid loss (MSE + variational bound).
    """
    if use_kl:
        loss_type = gd.LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = gd.LossType.RESCALED_MSE
    else:
        loss_type = gd.LossType.MSE
    if learn_sigma:
        var_type = gd.ModelVarType.LEARNED_RANGE
    else:
        var_type = gd.ModelVarType.FIXED_SMALL if sigma_small else gd.ModelVarType.FIXED_LARGE
    if not timestep_respacing:
        timestep_respacing = [diffusion_steps]
    return SpacedDiffusion(
        use_timesteps=space_timesteps(diffusion_steps, timestep_respacing),
        betas=gd.get_named_beta_schedule(noise_schedule, diffusion_steps),
        model_mean_type=gd.ModelMeanType.START_X if predict_xstart else gd.ModelMeanType.EPSILON,
        model_var_type=var_type,
        loss_type=loss_type,
    )


__all__ = ["NUM_TRAIN_STEPS", "create_diffusion", "space_timesteps", "SpacedDiffusion", "gd"]
