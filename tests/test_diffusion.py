"""diffusion/: the order of random draws, bad requests, the plain KL loss, custom noise, guidance by
mean and score, DDIM's reverse step. (The comparisons with reference vectors: test_reference_vectors.py.)"""
from __future__ import annotations

import pytest
import torch

from conftest import StandIn, assert_close_to_reference, load_golden, load_golden_model
from diffusion import create_diffusion, gaussian_diffusion as gd, space_timesteps
from models import DiT

DIFFUSION = load_golden("diffusion")


def test_space_timesteps_rejects_impossible_requests():
    with pytest.raises(ValueError, match="exactly 300 of 1000 steps"):
        space_timesteps(1000, "ddim300")
    with pytest.raises(ValueError, match="cannot take 20 steps from a section of 10"):
        space_timesteps(20, "5,20")


def test_unknown_schedule():
    with pytest.raises(ValueError, match="unknown noise schedule 'cosine'"):
        create_diffusion("", noise_schedule="cosine")


def test_training_losses_draws_noise_before_the_model():
    diffusion = create_diffusion("")
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([3, 700])
    drawn_in_model = []

    def model(x_t, t):
        drawn_in_model.append(torch.rand(1))
        return torch.zeros(2, 8, 8, 8)

    torch.manual_seed(7)
    noise = torch.randn_like(x)
    after_noise = torch.rand(1)
    torch.manual_seed(7)
    terms = diffusion.training_losses(model, x, t)
    torch.testing.assert_close(terms["mse"], (noise**2).mean(dim=(1, 2, 3)))
    assert torch.equal(drawn_in_model[0], after_noise)


def test_wrong_model_output_shape_is_rejected():
    diffusion = create_diffusion("")
    with pytest.raises(ValueError, match=r"model output shape \(2, 4, 8, 8\), expected \(2, 8, 8, 8\)"):
        diffusion.training_losses(lambda x, t: torch.zeros(2, 4, 8, 8), torch.zeros(2, 4, 8, 8), torch.tensor([1, 2]))


def test_plain_kl_loss_is_the_unscaled_bound():
    betas = gd.get_named_beta_schedule("linear", 1000)
    kwargs = dict(betas=betas, model_mean_type=gd.ModelMeanType.EPSILON, model_var_type=gd.ModelVarType.LEARNED_RANGE)
    kl = gd.GaussianDiffusion(loss_type=gd.LossType.KL, **kwargs)
    rescaled = gd.GaussianDiffusion(loss_type=gd.LossType.RESCALED_KL, **kwargs)
    case = DIFFUSION["cases"]["rescaled_kl"]
    args = (StandIn(case["model_output"]), DIFFUSION["x_start"], case["t"])
    loss = kl.training_losses(*args, noise=DIFFUSION["noise"])["loss"]
    assert_close_to_reference(loss * 1000, rescaled.training_losses(*args, noise=DIFFUSION["noise"])["loss"])


# ---------------------------------------------------------------- whole loops


@pytest.fixture(scope="module")
def tiny_model() -> DiT:
    return load_golden_model("model_tiny")[0]


def test_custom_noise_fn_replaces_the_global_draws(tiny_model):
    """noise_fn draws the per-step noise: a generator-backed one gives the same result as
    seeding the global generator identically, and leaves the global generator untouched."""
    diffusion = create_diffusion("10")
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    y = torch.tensor([1, 2])
    torch.manual_seed(4)
    expected = diffusion.p_sample_loop(tiny_model, z.shape, z, model_kwargs=dict(y=y))
    gen = torch.Generator().manual_seed(4)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    out = diffusion.p_sample_loop(
        tiny_model, z.shape, z, model_kwargs=dict(y=y), noise_fn=lambda x: torch.randn(x.shape, generator=gen)
    )
    assert torch.equal(out, expected)
    assert torch.equal(torch.get_rng_state(), state)


def test_condition_mean_and_score_shift_the_prediction(tiny_model):
    """Classifier guidance with a constant gradient g: the mean moves by variance * g (DDPM),
    and the DDIM eps moves by -sqrt(1 - alpha_bar) * g."""
    diffusion = create_diffusion("10")
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([5, 9])
    y = torch.tensor([3, 4])
    g = torch.full_like(x, 0.3)
    out = diffusion.p_mean_variance(tiny_model, x, t, clip_denoised=False, model_kwargs=dict(y=y))
    shifted = diffusion.condition_mean(lambda x, t, y: g, out, x, t, model_kwargs=dict(y=y))
    torch.testing.assert_close(shifted, out["mean"] + out["variance"] * g)

    score = diffusion.condition_score(lambda x, t, y: g, out, x, t, model_kwargs=dict(y=y))
    alpha_bar = torch.from_numpy(diffusion.alphas_cumprod)[t].float().view(-1, 1, 1, 1)
    eps = diffusion._predict_eps_from_xstart(x, t, out["pred_xstart"])
    torch.testing.assert_close(
        diffusion._predict_eps_from_xstart(x, t, score["pred_xstart"]), eps - (1 - alpha_bar).sqrt() * g
    )


def test_ddim_reverse_inverts_a_deterministic_step(tiny_model):
    """With an x_0 predictor that ignores its input, DDIM's reverse step undoes the forward step."""
    diffusion = create_diffusion("ddim10")
    x0 = torch.randn(2, 4, 8, 8).clamp(-1, 1)

    def oracle(x, t, y):
        a = torch.from_numpy(diffusion.alphas_cumprod)[diffusion.timestep_map.index(int(t[0]))].float()
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], dim=1)

    x_t = diffusion.q_sample(x0, torch.tensor([6, 6]), torch.randn_like(x0))
    kwargs = dict(clip_denoised=False, model_kwargs=dict(y=torch.tensor([0, 1])))
    x_prev = diffusion.ddim_sample(oracle, x_t, torch.tensor([6, 6]), **kwargs)["sample"]
    back = diffusion.ddim_reverse_sample(oracle, x_prev, torch.tensor([5, 5]), **kwargs)["sample"]
    torch.testing.assert_close(back, x_t, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="eta = 0"):
        diffusion.ddim_reverse_sample(oracle, x_prev, torch.tensor([5, 5]), eta=0.5, **kwargs)
