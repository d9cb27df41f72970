"""The speed-ups keep the fp32 results: torch.compile (training and sampling), fused AdamW,
bf16 autocast within bf16 rounding. (Fused attention and the vectorised EMA are tested in
test_models.py and test_training.py.)"""
from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.utils import counters
from torch._inductor import config as inductor_config

from conftest import load_golden, load_golden_model, randomize_
from diffusion import create_diffusion
from models import DiT
from util.sampling import compile_for_sampling
from util.training import build_optimizer, compile_for_training


def tiny_model(seed: int = 0) -> DiT:
    """The reference-vector model's configuration, with every weight random."""
    return randomize_(load_golden_model()[0], seed, std=0.05)


@pytest.fixture
def fresh_compiler():
    """Forget earlier compilations; afterwards, check that the code under test passed its
    inductor settings to its own compilation instead of changing them for the process."""
    torch._dynamo.reset()
    counters.clear()
    before = {name: getattr(inductor_config, name) for name in ("freezing", "fallback_random")}
    yield
    assert {name: getattr(inductor_config, name) for name in before} == before
    torch._dynamo.reset()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.slow
def test_compiled_training_matches_eager(fresh_compiler):
    """Same losses (label dropout included: it must draw from the same generator) and gradients."""
    eager = tiny_model().train()
    compiled_model = copy.deepcopy(eager)
    compiled = compile_for_training(compiled_model)
    diffusion = create_diffusion("")
    x = torch.randn(6, 4, 8, 8)
    t = torch.tensor([0, 1, 10, 300, 700, 999])
    y = torch.tensor([0, 1, 2, 3, 4, 5])

    def loss_and_grads(model, params):
        torch.manual_seed(3)
        loss = diffusion.training_losses(model, x, t, dict(y=y))["loss"].mean()
        grads = torch.autograd.grad(loss, [p for p in params if p.requires_grad])
        return loss, grads

    loss_e, grads_e = loss_and_grads(eager, eager.parameters())
    loss_c, grads_c = loss_and_grads(compiled, compiled_model.parameters())
    assert counters["stats"]["unique_graphs"] >= 1  # it really ran a compiled graph
    assert relative_error(loss_c, loss_e) < 1e-5
    for g_c, g_e in zip(grads_c, grads_e):
        assert relative_error(g_c, g_e) < 1e-4


@pytest.mark.slow
def test_compiled_sampling_matches_eager(fresh_compiler):
    eager = tiny_model().eval().requires_grad_(False)
    compiled = compile_for_sampling(copy.deepcopy(eager))
    data = load_golden("model_tiny")
    args = (data["cfg_x"], data["cfg_t"], data["cfg_y"], 4.0)
    with torch.no_grad():
        expected = eager.forward_with_cfg(*args)
        out = compiled.forward_with_cfg(*args)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            eager_bf16 = eager.forward_with_cfg(*args).float()
            compiled_bf16 = compiled.forward_with_cfg(*args).float()
    assert counters["stats"]["unique_graphs"] >= 1
    assert relative_error(out, expected) < 1e-5
    # In bf16 both round differently; neither strays further from fp32 than bf16 rounding.
    assert relative_error(eager_bf16, expected) < 3e-2
    assert relative_error(compiled_bf16, expected) < 3e-2


@pytest.mark.slow
def test_compiled_sampling_freezes_the_weights(fresh_compiler):
    """Freezing really applies: the compiled graph holds the weights as constants, so a later
    in-place change of a weight is not seen (why sampling compiles only frozen models)."""
    model = compile_for_sampling(tiny_model().eval())
    data = load_golden("model_tiny")
    with torch.no_grad():
        before = model(data["x"], data["t"], data["y"])
        model.blocks[0].mlp.fc1.weight.mul_(2.0)
        model.final_layer.linear.weight.mul_(2.0)
        after = model(data["x"], data["t"], data["y"])
    assert torch.equal(before, after)


def test_fused_adamw_matches_the_per_parameter_loop():
    """Fed the same gradients, the fused optimizer follows the textbook per-parameter AdamW.
    (Gradients from backprop would differ in the last bits, and Adam amplifies that for
    near-zero gradients, so the comparison isolates the optimizer.)"""
    model = tiny_model()
    reference = copy.deepcopy(model)
    fused = build_optimizer(model, 1e-3)
    loop = torch.optim.AdamW(reference.parameters(), lr=1e-3, weight_decay=0, foreach=False, fused=False)
    assert fused.defaults["fused"] and fused.defaults["weight_decay"] == 0 and fused.defaults["betas"] == (0.9, 0.999)
    gen = torch.Generator().manual_seed(0)
    start = [p.detach().clone() for p in model.parameters()]
    for _ in range(5):
        for p, q in zip(model.parameters(), reference.parameters()):
            if p.requires_grad:
                p.grad = torch.randn(p.shape, generator=gen)
                q.grad = p.grad.clone()
        fused.step()
        loop.step()
    for p, q, p0 in zip(model.parameters(), reference.parameters(), start):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        assert torch.equal(p, p0) != p.requires_grad  # trained parameters moved, pos_embed did not


def test_bf16_autocast_stays_within_bf16_rounding():
    model = tiny_model().eval()
    data = load_golden("model_tiny")
    with torch.no_grad():
        fp32 = model(data["x"], data["t"], data["y"])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(data["x"], data["t"], data["y"])
    assert bf16.dtype == torch.bfloat16
    error = relative_error(bf16.float(), fp32)
    assert 1e-5 < error < 2e-2  # really ran in bf16, and stayed close
