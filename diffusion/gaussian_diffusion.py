"""Gaussian diffusion as in Improved DDPM (Nichol & Dhariwal, 2021): noise schedules,
learned variances, the hybrid loss, DDPM/DDIM sampling and bits-per-dim evaluation.

Equation numbers below refer to Ho et al. 2020 ("DDPM", arXiv:2006.11239), Nichol &
Dhariwal 2021 ("Improved DDPM", arXiv:2102.09672) and Song et al. 2021 ("DDIM",
arXiv:2010.02502). t runs from 0 to T-1 here; the papers count from 1 to T.

Schedule arithmetic is done in float64 and gathered per timestep before the cast to
float32. Random draws happen in a fixed order (see each method) so that equal seeds give
equal results.
"""
from __future__ import annotations

import enum
import math
from typing import Any, Callable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from .diffusion_utils import discretized_gaussian_log_likelihood, mean_flat, normal_kl


class ModelMeanType(enum.Enum):
    START_X = enum.auto()  # the model predicts x_0
    EPSILON = enum.auto()  # the model predicts the noise


class ModelVarType(enum.Enum):
    LEARNED = enum.auto()  # the model outputs log-variance directly
    FIXED_SMALL = enum.auto()  # posterior variance beta~_t
    FIXED_LARGE = enum.auto()  # beta_t (with beta~_1 at t=0)
    LEARNED_RANGE = enum.auto()  # the model interpolates log-variance between the two above


class LossType(enum.Enum):
    MSE = enum.auto()  # eps/x_0 MSE, plus the vb term when the variance is learned
    RESCALED_MSE = enum.auto()  # as MSE, with the vb term scaled by T/1000
    KL = enum.auto()  # the variational bound alone
    RESCALED_KL = enum.auto()  # the variational bound times T

    def is_vb(self) -> bool:
        return self in (LossType.KL, LossType.RESCALED_KL)


def betas_for_alpha_bar(num_steps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999) -> np.ndarray:
    """Betas that make prod(1 - beta) follow alpha_bar(t) on t in [0, 1], each capped at max_beta."""
    return np.array(
        [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta) for i in range(num_steps)],
        dtype=np.float64,
    )


def get_named_beta_schedule(schedule_name: str, num_diffusion_timesteps: int) -> np.ndarray:
    """'linear' (DDPM Section 4: 1e-4 to 0.02 over 1000 steps, rescaled so any T matches it)
    or 'squaredcos_cap_v2' (Improved DDPM's cosine schedule, Section 3.2, offset s = 0.008)."""
    if schedule_name == "linear":
        scale = 1000 / num_diffusion_timesteps
        return np.linspace(scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)
    if schedule_name == "squaredcos_cap_v2":
        return betas_for_alpha_bar(num_diffusion_timesteps, lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2)
    raise ValueError(f"unknown noise schedule {schedule_name!r}; use 'linear' or 'squaredcos_cap_v2'")


class GaussianDiffusion:
    """Forward process, reverse process and losses for one beta schedule.

    `model(x_t, t, **model_kwargs)` returns the eps (or x_0) prediction, followed along
    the channel dimension by the variance channels when the variance is learned.
    """

    def __init__(self, *, betas: np.ndarray, model_mean_type: ModelMeanType, model_var_type: ModelVarType, loss_type: LossType):
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type

        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must be a 1-D array with values in (0, 1]")
        self.betas = betas
        self.num_timesteps = len(betas)

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)

        # q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)  (DDPM eq. 4)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.one_minus_alphas_cumprod = 1.0 - self.alphas_cumprod
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)

        # q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, beta~_t I)  (DDPM eqs. 6-7)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t=0: its log is clipped to the value at t=1, or to
        # beta_0 in a one-step process (which has no t=1; its only step adds no noise).
        variance_at_1 = self.posterior_variance[1] if self.num_timesteps > 1 else betas[0]
        self.posterior_log_variance_clipped = np.log(np.append(variance_at_1, self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)

        # p(x_{t-1} | x_t) variances: the two fixed choices of DDPM Section 3.2 and the log(beta_t)
        # end of Improved DDPM's learned interpolation (eq. 15)
        self.log_betas = np.log(betas)
        self.fixed_large_variance = np.append(variance_at_1, betas[1:])
        self.fixed_large_log_variance = np.log(self.fixed_large_variance)

        self._tables: dict[tuple[str, torch.device], torch.Tensor] = {}

    # ------------------------------------------------------------------ table look-up

    def _extract(self, name: str, t: torch.Tensor, ndim: int) -> torch.Tensor:
        """Gather table `name` (float64) at timesteps t, cast to float32, shaped (N, 1, ..., 1)."""
        key = (name, t.device)
        if key not in self._tables:
            self._tables[key] = torch.from_numpy(getattr(self, name)).to(t.device)
        return self._tables[key][t].float().reshape(-1, *([1] * (ndim - 1)))

    def _nonzero_mask(self, t: torch.Tensor, ndim: int) -> torch.Tensor:
        """1 where t > 0, 0 at the last step (which adds no noise)."""
        return (t != 0).float().reshape(-1, *([1] * (ndim - 1)))

    # ------------------------------------------------------------------ forward process

    def q_mean_variance(self, x_start: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and log-variance of q(x_t | x_0) (DDPM eq. 4)."""
        mean = self._extract("sqrt_alphas_cumprod", t, x_start.dim()) * x_start
        variance = self._extract("one_minus_alphas_cumprod", t, x_start.dim()).expand_as(x_start)
        log_variance = self._extract("log_one_minus_alphas_cumprod", t, x_start.dim()).expand_as(x_start)
        return mean, variance, log_variance

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise (DDPM eq. 4;
        noise drawn with randn_like when not given)."""
        if noise is None:
            noise = torch.randn_like(x_start)
        if noise.shape != x_start.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} differs from x_start shape {tuple(x_start.shape)}")
        return (
            self._extract("sqrt_alphas_cumprod", t, x_start.dim()) * x_start
            + self._extract("sqrt_one_minus_alphas_cumprod", t, x_start.dim()) * noise
        )

    def q_posterior_mean_variance(
        self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0) (DDPM eqs. 6-7)."""
        n = x_t.dim()
        mean = self._extract("posterior_mean_coef1", t, n) * x_start + self._extract("posterior_mean_coef2", t, n) * x_t
        variance = self._extract("posterior_variance", t, n).expand_as(x_t)
        log_variance = self._extract("posterior_log_variance_clipped", t, n).expand_as(x_t)
        return mean, variance, log_variance

    # ------------------------------------------------------------------ reverse process

    def _predict_xstart_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """DDPM eq. 4 solved for x_0: (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)."""
        n = x_t.dim()
        return self._extract("sqrt_recip_alphas_cumprod", t, n) * x_t - self._extract("sqrt_recipm1_alphas_cumprod", t, n) * eps

    def _predict_eps_from_xstart(self, x_t: torch.Tensor, t: torch.Tensor, pred_xstart: torch.Tensor) -> torch.Tensor:
        """DDPM eq. 4 solved for the noise."""
        n = x_t.dim()
        return (self._extract("sqrt_recip_alphas_cumprod", t, n) * x_t - pred_xstart) / self._extract(
            "sqrt_recipm1_alphas_cumprod", t, n
        )

    def p_mean_variance(
        self,
        model: Callable[..., Any],
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        model_kwargs: dict | None = None,
    ) -> dict[str, Any]:
        """Run the model once and return p(x_{t-1} | x_t): mean, variance, log_variance,
        pred_xstart, and `extra` (whatever the model returned beside its output, or None).

        The mean is the posterior mean (DDPM eq. 7) at the predicted x_0; for an eps
        prediction without clipping this equals DDPM's eq. 11, mu = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_t).
        """
        model_kwargs = {} if model_kwargs is None else model_kwargs
        channels = x.shape[1]
        model_output = model(x, t, **model_kwargs)
        extra = None
        if isinstance(model_output, tuple):
            model_output, extra = model_output

        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            if model_output.shape[1] != 2 * channels:
                raise ValueError(
                    f"a learned variance needs {2 * channels} output channels, the model gave {model_output.shape[1]}"
                )
            model_output, var_values = torch.split(model_output, channels, dim=1)
            if self.model_var_type == ModelVarType.LEARNED:
                model_log_variance = var_values
            else:
                min_log = self._extract("posterior_log_variance_clipped", t, x.dim())
                max_log = self._extract("log_betas", t, x.dim())
                # Improved DDPM eq. 15: Sigma = exp(v log beta_t + (1 - v) log beta~_t), v = frac.
                frac = (var_values + 1) / 2  # the model's output lies in [-1, 1]
                model_log_variance = frac * max_log + (1 - frac) * min_log
            model_variance = torch.exp(model_log_variance)
        else:
            if self.model_var_type == ModelVarType.FIXED_LARGE:
                var_name, log_var_name = "fixed_large_variance", "fixed_large_log_variance"
            else:
                var_name, log_var_name = "posterior_variance", "posterior_log_variance_clipped"
            model_variance = self._extract(var_name, t, x.dim()).expand_as(x)
            model_log_variance = self._extract(log_var_name, t, x.dim()).expand_as(x)

        def process_xstart(x0: torch.Tensor) -> torch.Tensor:
            if denoised_fn is not None:
                x0 = denoised_fn(x0)
            return x0.clamp(-1, 1) if clip_denoised else x0

        if self.model_mean_type == ModelMeanType.START_X:
            pred_xstart = process_xstart(model_output)
        else:
            pred_xstart = process_xstart(self._predict_xstart_from_eps(x, t, model_output))
        model_mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {
            "mean": model_mean,
            "variance": model_variance,
            "log_variance": model_log_variance,
            "pred_xstart": pred_xstart,
            "extra": extra,
        }

    def condition_mean(self, cond_fn: Callable[..., torch.Tensor], p_mean_var: dict, x: torch.Tensor, t: torch.Tensor, model_kwargs: dict | None = None) -> torch.Tensor:
        """Shift the mean by variance * grad log p(y | x) (Sohl-Dickstein et al., 2015)."""
        model_kwargs = {} if model_kwargs is None else model_kwargs
        gradient = cond_fn(x, t, **model_kwargs)
        return p_mean_var["mean"].float() + p_mean_var["variance"] * gradient.float()

    def condition_score(self, cond_fn: Callable[..., torch.Tensor], p_mean_var: dict, x: torch.Tensor, t: torch.Tensor, model_kwargs: dict | None = None) -> dict[str, Any]:
        """Shift the predicted noise by the classifier score (Song et al., 2020), as DDIM needs."""
        model_kwargs = {} if model_kwargs is None else model_kwargs
        alpha_bar = self._extract("alphas_cumprod", t, x.dim())
        eps = self._predict_eps_from_xstart(x, t, p_mean_var["pred_xstart"])
        eps = eps - (1 - alpha_bar).sqrt() * cond_fn(x, t, **model_kwargs)
        out = dict(p_mean_var)
        out["pred_xstart"] = self._predict_xstart_from_eps(x, t, eps)
        out["mean"], _, _ = self.q_posterior_mean_variance(out["pred_xstart"], x, t)
        return out

    def p_sample(
        self,
        model: Callable[..., Any],
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: Callable | None = None,
        cond_fn: Callable | None = None,
        model_kwargs: dict | None = None,
        noise_fn: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like,
    ) -> dict[str, torch.Tensor]:
        """One ancestral step x_t -> x_{t-1}. Draws noise_fn(x) (randn_like) after the model
        call, also at t=0 where it is multiplied by zero."""
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs)
        noise = noise_fn(x)
        if cond_fn is not None:
            out["mean"] = self.condition_mean(cond_fn, out, x, t, model_kwargs=model_kwargs)
        sample = out["mean"] + self._nonzero_mask(t, x.dim()) * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def p_sample_loop(
        self,
        model: Callable[..., Any],
        shape: tuple[int, ...] | list[int],
        noise: torch.Tensor | None = None,
        clip_denoised: bool = True,
        denoised_fn: Callable | None = None,
        cond_fn: Callable | None = None,
        model_kwargs: dict | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
        noise_fn: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like,
    ) -> torch.Tensor:
        """Ancestral sampling from pure noise to x_0; returns the final sample.

        noise_fn draws each step's noise (default randn_like from the global generator);
        pass another to take it from per-sample generators.
        """
        final = None
        for final in self.p_sample_loop_progressive(
            model, shape, noise=noise, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
            cond_fn=cond_fn, model_kwargs=model_kwargs, device=device, progress=progress, noise_fn=noise_fn,
        ):
            pass
        return final["sample"]

    def p_sample_loop_progressive(
        self,
        model: Callable[..., Any],
        shape: tuple[int, ...] | list[int],
        noise: torch.Tensor | None = None,
        clip_denoised: bool = True,
        denoised_fn: Callable | None = None,
        cond_fn: Callable | None = None,
        model_kwargs: dict | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
        noise_fn: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Yield p_sample's output at every step, from t = T-1 down to 0."""
        yield from self._loop(
            lambda img, t: self.p_sample(
                model, img, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                cond_fn=cond_fn, model_kwargs=model_kwargs, noise_fn=noise_fn,
            ),
            model, shape, noise, device, progress,
        )

    def _loop(self, step, model, shape, noise, device, progress) -> Iterator[dict[str, torch.Tensor]]:
        """Shared driver of the sampling loops: starting noise, then `step` from T-1 to 0."""
        if not isinstance(shape, (tuple, list)):
            raise TypeError(f"shape must be a tuple or list, got {type(shape).__name__}")
        if device is None:
            device = noise.device if noise is not None else next(model.parameters()).device
        img = noise if noise is not None else torch.randn(*shape, device=device)
        indices = range(self.num_timesteps - 1, -1, -1)
        for i in tqdm(indices, disable=not progress):
            t = torch.full((shape[0],), i, device=device, dtype=torch.long)
            with torch.no_grad():
                out = step(img, t)
            yield out
            img = out["sample"]

    def ddim_sample(
        self,
        model: Callable[..., Any],
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: Callable | None = None,
        cond_fn: Callable | None = None,
        model_kwargs: dict | None = None,
        eta: float = 0.0,
        noise_fn: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like,
    ) -> dict[str, torch.Tensor]:
        """One DDIM step x_t -> x_{t-1} (DDIM eq. 12, sigma_t from eq. 16); eta=0 is
        deterministic, eta=1 matches DDPM's posterior variance. Draws noise_fn(x) (randn_like)
        after the model call, like p_sample."""
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs)
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs=model_kwargs)
        # Recompute eps from the (possibly clipped) x_0 so that both are consistent.
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = self._extract("alphas_cumprod", t, x.dim())
        alpha_bar_prev = self._extract("alphas_cumprod_prev", t, x.dim())
        sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        noise = noise_fn(x)
        mean_pred = out["pred_xstart"] * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        sample = mean_pred + self._nonzero_mask(t, x.dim()) * sigma * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_reverse_sample(
        self,
        model: Callable[..., Any],
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: Callable | None = None,
        cond_fn: Callable | None = None,
        model_kwargs: dict | None = None,
        eta: float = 0.0,
    ) -> dict[str, torch.Tensor]:
        """One deterministic DDIM step towards noise, x_t -> x_{t+1} (eta must be 0)."""
        if eta != 0.0:
            raise ValueError("the reverse DDIM step is only defined for eta = 0")
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs)
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs=model_kwargs)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar_next = self._extract("alphas_cumprod_next", t, x.dim())
        mean_pred = out["pred_xstart"] * torch.sqrt(alpha_bar_next) + torch.sqrt(1 - alpha_bar_next) * eps
        return {"sample": mean_pred, "pred_xstart": out["pred_xstart"]}

    def ddim_sample_loop(
        self,
        model: Callable[..., Any],
        shape: tuple[int, ...] | list[int],
        noise: torch.Tensor | None = None,
        clip_denoised: bool = True,
        denoised_fn: Callable | None = None,
        cond_fn: Callable | None = None,
        model_kwargs: dict | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
        eta: float = 0.0,
        noise_fn: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like,
    ) -> torch.Tensor:
        """DDIM sampling from pure noise to x_0; returns the final sample (noise_fn as in p_sample_loop)."""
        final = None
        for final in self.ddim_sample_loop_progressive(
            model, shape, noise=noise, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
            cond_fn=cond_fn, model_kwargs=model_kwargs, device=device, progress=progress, eta=eta,
            noise_fn=noise_fn,
        ):
            pass
        return final["sample"]

    def ddim_sample_loop_progressive(
        self,
        model: Callable[..., Any],
        shape: tuple[int, ...] | list[int],
        noise: torch.Tensor | None = None,
        clip_denoised: bool = True,
        denoised_fn: Callable | None = None,
        cond_fn: Callable | None = None,
        model_kwargs: dict | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
        eta: float = 0.0,
        noise_fn: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Yield ddim_sample's output at every step, from t = T-1 down to 0."""
        yield from self._loop(
            lambda img, t: self.ddim_sample(
                model, img, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                cond_fn=cond_fn, model_kwargs=model_kwargs, eta=eta, noise_fn=noise_fn,
            ),
            model, shape, noise, device, progress,
        )

    # ------------------------------------------------------------------ losses

    def _vb_terms_bpd(
        self,
        model: Callable[..., Any],
        x_start: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        model_kwargs: dict | None = None,
    ) -> dict[str, torch.Tensor]:
        """One term of the variational bound (DDPM eq. 5) in bits per dimension: L_{t-1} =
        KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0, and at t = 0 the decoder NLL
        L_0 = -log p(x_0 | x_1) under the discretised Gaussian of DDPM Section 3.3 (eq. 13)."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(x_start, means=out["mean"], log_scales=0.5 * out["log_variance"])
        decoder_nll = mean_flat(decoder_nll) / math.log(2.0)
        return {"output": torch.where(t == 0, decoder_nll, kl), "pred_xstart": out["pred_xstart"]}

    def training_losses(
        self,
        model: Callable[..., Any],
        x_start: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: dict | None = None,
        noise: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-sample losses at timesteps t: a dict with `loss`, and `mse`/`vb` for MSE losses.

        MSE with eps prediction is DDPM's L_simple (eq. 14); with a learned variance the vb
        term is added, giving Improved DDPM's hybrid loss (eq. 16). Draws the noise
        (randn_like(x_start)) before the model call when it is not given.
        """
        model_kwargs = {} if model_kwargs is None else model_kwargs
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        terms: dict[str, torch.Tensor] = {}

        if self.loss_type.is_vb():
            terms["loss"] = self._vb_terms_bpd(model, x_start, x_t, t, clip_denoised=False, model_kwargs=model_kwargs)["output"]
            if self.loss_type == LossType.RESCALED_KL:
                terms["loss"] = terms["loss"] * self.num_timesteps
            return terms

        model_output = model(x_t, t, **model_kwargs)
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            channels = x_t.shape[1]
            expected = (x_t.shape[0], 2 * channels, *x_t.shape[2:])
            if tuple(model_output.shape) != expected:
                raise ValueError(f"model output shape {tuple(model_output.shape)}, expected {expected}")
            model_output, var_values = torch.split(model_output, channels, dim=1)
            # The vb term sees a detached mean, so it trains only the variance; the MSE trains the mean.
            frozen = torch.cat([model_output.detach(), var_values], dim=1)
            terms["vb"] = self._vb_terms_bpd(lambda *args, **kwargs: frozen, x_start, x_t, t, clip_denoised=False)["output"]
            # Hybrid loss L_simple + 0.001 L_vlb (Improved DDPM eq. 16): L_vlb is estimated as T
            # times this one term, so at T = 1000 the term enters unscaled; RESCALED_MSE keeps the
            # weight 0.001 * T for other T.
            if self.loss_type == LossType.RESCALED_MSE:
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)

        target = x_start if self.model_mean_type == ModelMeanType.START_X else noise
        if model_output.shape != target.shape:
            raise ValueError(f"model output shape {tuple(model_output.shape)}, expected {tuple(target.shape)}")
        terms["mse"] = mean_flat((target - model_output) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms

    # ------------------------------------------------------------------ evaluation

    def _prior_bpd(self, x_start: torch.Tensor) -> torch.Tensor:
        """KL(q(x_T | x_0) || N(0, I)) in bits per dimension: the L_T term of DDPM eq. 5, not
        learnable, but part of the bound."""
        t = torch.full((x_start.shape[0],), self.num_timesteps - 1, device=x_start.device, dtype=torch.long)
        mean, _, log_variance = self.q_mean_variance(x_start, t)
        return mean_flat(normal_kl(mean, log_variance, 0.0, 0.0)) / math.log(2.0)

    def calc_bpd_loop(
        self,
        model: Callable[..., Any],
        x_start: torch.Tensor,
        clip_denoised: bool = True,
        model_kwargs: dict | None = None,
    ) -> dict[str, torch.Tensor]:
        """The whole variational bound in bits per dimension, with per-step terms.

        Draws one randn_like(x_start) per timestep, from T-1 down to 0. Returns total_bpd,
        prior_bpd (N,) and vb, xstart_mse, mse (N, T).
        """
        vb, xstart_mse, mse = [], [], []
        for i in range(self.num_timesteps - 1, -1, -1):
            t = torch.full((x_start.shape[0],), i, device=x_start.device, dtype=torch.long)
            noise = torch.randn_like(x_start)
            x_t = self.q_sample(x_start, t, noise=noise)
            with torch.no_grad():
                out = self._vb_terms_bpd(model, x_start, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
            vb.append(out["output"])
            xstart_mse.append(mean_flat((out["pred_xstart"] - x_start) ** 2))
            eps = self._predict_eps_from_xstart(x_t, t, out["pred_xstart"])
            mse.append(mean_flat((eps - noise) ** 2))

        vb_t = torch.stack(vb, dim=1)
        prior_bpd = self._prior_bpd(x_start)
        return {
            "total_bpd": vb_t.sum(dim=1) + prior_bpd,
            "prior_bpd": prior_bpd,
            "vb": vb_t,
            "xstart_mse": torch.stack(xstart_mse, dim=1),
            "mse": torch.stack(mse, dim=1),
        }
