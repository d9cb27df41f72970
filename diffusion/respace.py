"""Sampling with fewer steps than training (Improved DDPM, Nichol & Dhariwal 2021, Section 4):
keep a subsequence S of the timesteps and recompute the betas, beta_{S_i} = 1 - alpha_bar_{S_i} /
alpha_bar_{S_{i-1}}, so that the kept steps have the same alpha_bar as in the full process; the
posterior variances follow from these betas as in the full process."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch

from .gaussian_diffusion import GaussianDiffusion


def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int]) -> set[int]:
    """Timesteps to keep out of `num_timesteps`.

    section_counts is either "ddimN" (an integer stride that keeps exactly N steps, as in
    DDIM) or a list / comma-separated string of counts: the process is cut into that many
    equal sections and each section keeps that many evenly spaced steps, e.g. "10,15,20".
    A single step in all ("1", "ddim1") keeps the last step, T-1.
    """
    if section_counts in ("1", "ddim1", [1], (1,)):
        # Sampling starts from pure noise at T-1; the rules below would keep step 0 instead.
        return {num_timesteps - 1}
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"cannot keep exactly {desired} of {num_timesteps} steps with an integer stride")
        section_counts = [int(count) for count in section_counts.split(",")]

    size_per, extra = divmod(num_timesteps, len(section_counts))
    kept: list[int] = []
    start = 0
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot take {count} steps from a section of {size} steps")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        # Accumulate the position (not j * stride): float rounding decides ties like 49.5.
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    return set(kept)


class _OriginalTimesteps:
    """Calls the model with the original timestep index of each spaced step: the model was
    trained on indices 0..T-1 of the full process, not on positions in the subsequence."""

    def __init__(self, model: Callable[..., Any], diffusion: SpacedDiffusion):
        self.model = model
        self.diffusion = diffusion

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **kwargs) -> Any:
        return self.model(x, self.diffusion.original_timesteps(t), **kwargs)


class SpacedDiffusion(GaussianDiffusion):
    """A GaussianDiffusion over the kept timesteps `use_timesteps` of a base process."""

    def __init__(self, use_timesteps: Sequence[int] | set[int], **kwargs):
        self.use_timesteps = set(use_timesteps)
        base = GaussianDiffusion(**kwargs)
        self.original_num_steps = base.num_timesteps
        self.timestep_map: list[int] = []
        new_betas = []
        last_alpha_cumprod = 1.0
        for i, alpha_cumprod in enumerate(base.alphas_cumprod):
            if i in self.use_timesteps:
                new_betas.append(1 - alpha_cumprod / last_alpha_cumprod)
                last_alpha_cumprod = alpha_cumprod
                self.timestep_map.append(i)
        kwargs["betas"] = np.array(new_betas)
        super().__init__(**kwargs)
        self._timestep_tables: dict[torch.device, torch.Tensor] = {}

    def original_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The original index of each spaced step in t. The table is copied to t's device once:
        a copy from host memory at every call would make the host wait for the device."""
        if t.device not in self._timestep_tables:
            self._timestep_tables[t.device] = torch.tensor(self.timestep_map, device=t.device)
        return self._timestep_tables[t.device][t].to(t.dtype)

    def _wrap_model(self, model: Callable[..., Any]) -> Callable[..., Any]:
        if isinstance(model, _OriginalTimesteps):
            return model
        return _OriginalTimesteps(model, self)

    def p_mean_variance(self, model, *args, **kwargs):
        return super().p_mean_variance(self._wrap_model(model), *args, **kwargs)

    def training_losses(self, model, *args, **kwargs):
        return super().training_losses(self._wrap_model(model), *args, **kwargs)

    def condition_mean(self, cond_fn, *args, **kwargs):
        return super().condition_mean(self._wrap_model(cond_fn), *args, **kwargs)

    def condition_score(self, cond_fn, *args, **kwargs):
        return super().condition_score(self._wrap_model(cond_fn), *args, **kwargs)
