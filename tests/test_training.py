"""util/training.py: gradient accumulation gives the gradient of the mean loss over the global
batch, whatever its split into micro-batches and processes, and DDP communicates once per step;
the EMA, its warm-up schedule and how much of the initial weights it holds.

Run as a script under torchrun, this file is the worker of the two-process test.
"""
from __future__ import annotations

import copy
import math
import sys

import pytest
import torch

import train
from conftest import assert_state_dicts_equal, randomize_, run_script
from diffusion import create_diffusion
from models import DiT_models
from util.training import accumulated_step, build_optimizer, ema_decay_at, ema_initial_share, update_ema

GLOBAL_BATCH = 8


def fixed_batch() -> tuple[torch.Tensor, ...]:
    """A global batch with its timesteps and noise drawn up front, so any split sees the same ones."""
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(GLOBAL_BATCH, 4, 8, 8, generator=generator)
    labels = torch.arange(GLOBAL_BATCH) % 3
    t = torch.randint(0, 1000, (GLOBAL_BATCH,), generator=generator)
    noise = torch.randn(GLOBAL_BATCH, 4, 8, 8, generator=generator)
    return latents, labels, t, noise


def tiny_model() -> torch.nn.Module:
    # Random weights everywhere (adaLN-Zero layers included) so that every parameter gets a
    # gradient; eval mode turns off the random label dropout.
    torch.manual_seed(0)
    return randomize_(DiT_models["DiT-S/8"](input_size=8, num_classes=3)).eval()


def step_on_splits(model: torch.nn.Module, parts: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, dict, dict]:
    """One accumulated step over `parts`: the loss, the gradients, and the weights after the step."""
    optimizer = build_optimizer(model, 1e-3)
    loss, _, _ = accumulated_step(model, create_diffusion(""), optimizer, parts, len(parts))
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss, grads, {name: p.detach().clone() for name, p in model.named_parameters()}


def split(batch: tuple[torch.Tensor, ...], parts: int, rank: int = 0, world_size: int = 1) -> list[tuple[torch.Tensor, ...]]:
    """This rank's micro-batches: its share of the global batch, cut into `parts` pieces."""
    share = [x[rank * len(x) // world_size : (rank + 1) * len(x) // world_size] for x in batch]
    return list(zip(*[x.chunk(parts) for x in share]))


@pytest.mark.slow
@pytest.mark.parametrize("parts", [2, 4])
def test_accumulated_micro_batches_equal_one_large_batch(parts):
    batch = fixed_batch()
    loss, grads, _ = step_on_splits(tiny_model(), [batch])
    accumulated_loss, accumulated_grads, accumulated_weights = step_on_splits(tiny_model(), split(batch, parts))
    assert accumulated_loss.item() == pytest.approx(loss.item(), rel=1e-6)
    assert grads.keys() == accumulated_grads.keys() and len(grads) > 100
    for name in grads:
        torch.testing.assert_close(accumulated_grads[name], grads[name], rtol=1e-4, atol=1e-7, msg=name)
    # One optimizer step was taken, after the last micro-batch. (Adam's first step is about
    # lr x sign(gradient), which float noise flips for near-zero gradients: compared by gradients.)
    initial = dict(tiny_model().named_parameters())
    assert all(not torch.equal(accumulated_weights[name], initial[name]) for name in grads)


@pytest.mark.slow
def test_a_micro_batch_split_is_not_a_smaller_batch():
    # Sanity check of the test above: the gradient of only the first half differs.
    batch = fixed_batch()
    _, grads, _ = step_on_splits(tiny_model(), [batch])
    _, half_grads, _ = step_on_splits(tiny_model(), split(batch, 2)[:1])
    assert not torch.allclose(half_grads["final_layer.linear.weight"], grads["final_layer.linear.weight"], rtol=1e-3)


def ddp_worker(out: str) -> None:
    """Under torchrun: 2 processes x 2 micro-batches of 2 images; rank 0 saves its gradients and
    how many bucket all-reduces DDP had made before each micro-batch and after the step."""
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    model = tiny_model()
    ddp = DDP(model)
    calls: list[int] = []

    def counting_hook(state, bucket):
        calls.append(1)
        return allreduce_hook(state, bucket)

    def counting_micro_batches(parts):
        for part in parts:  # asked for lazily: the previous micro-batch's backward has run
            calls_before.append(len(calls))
            yield part

    ddp.register_comm_hook(None, counting_hook)
    calls_before: list[int] = []
    optimizer = build_optimizer(model, 1e-3)
    micro_batches = counting_micro_batches(split(fixed_batch(), 2, rank, world_size))
    accumulated_step(ddp, create_diffusion(""), optimizer, micro_batches, 2)
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    if rank == 0:
        torch.save({"grads": grads, "calls": [*calls_before, len(calls)]}, out)
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_with_accumulation_equal_one_large_batch(tmp_path):
    out = tmp_path / "ddp.pt"
    run_script(["tests/test_training.py", str(out)], nproc=2)
    _, grads, _ = step_on_splits(tiny_model(), [fixed_batch()])
    result = torch.load(out, weights_only=True)
    before_first, before_second, after_step = result["calls"]
    assert before_first == before_second == 0 < after_step  # no_sync: all-reduces after the last micro-batch only
    assert result["grads"].keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(result["grads"][name], grads[name], rtol=1e-4, atol=1e-7, msg=name)


def test_ema_warmup_is_tensorflows_num_updates_schedule():
    # TensorFlow's ExponentialMovingAverage with num_updates: min(decay, (1 + t) / (10 + t)).
    assert ema_decay_at(0.9999, 0, warmup=True) == pytest.approx(0.1)
    assert ema_decay_at(0.9999, 10, warmup=True) == pytest.approx(11 / 20)
    assert ema_decay_at(0.9999, 10**6, warmup=True) == 0.9999
    assert ema_decay_at(0.5, 100, warmup=True) == 0.5


@pytest.mark.slow
def test_ema_warmup_is_off_by_default_and_then_the_plain_decay():
    assert train.parse_args([]).ema_warmup is False
    assert all(ema_decay_at(0.9999, t, warmup=False) == 0.9999 for t in (0, 1, 10, 10**6))
    # The same EMA bit for bit as update_ema with the decay itself.
    torch.manual_seed(0)
    model = DiT_models["DiT-S/8"](input_size=8, num_classes=3)
    ema_a, ema_b = DiT_models["DiT-S/8"](input_size=8, num_classes=3), DiT_models["DiT-S/8"](input_size=8, num_classes=3)
    ema_b.load_state_dict(ema_a.state_dict())
    update_ema(ema_a, model, 0.9999)
    update_ema(ema_b, model, ema_decay_at(0.9999, 5, warmup=False))
    assert all(torch.equal(a, b) for a, b in zip(ema_a.state_dict().values(), ema_b.state_dict().values()))


@pytest.mark.parametrize("decay,updates", [(0.9999, 300), (0.99, 2000), (0.9, 50), (0.05, 7), (1.0, 40)])
def test_initial_share_is_the_product_of_the_decays(decay, updates):
    for warmup in (False, True):
        product = math.prod(ema_decay_at(decay, t, warmup) for t in range(updates))
        assert ema_initial_share(decay, updates, warmup) == pytest.approx(product, rel=1e-9)
    assert ema_initial_share(0.9999, 300, False) == pytest.approx(0.9704, abs=1e-4)


def test_update_ema_is_the_reference_formula():
    torch.manual_seed(0)
    model = DiT_models["DiT-S/8"](input_size=8, num_classes=3)
    ema = copy.deepcopy(model).requires_grad_(False)
    for p in model.parameters():
        p.data.add_(torch.randn_like(p))
    expected = {name: p.clone().mul_(0.99).add_(model.state_dict()[name], alpha=0.01) for name, p in ema.named_parameters()}
    update_ema(ema, model, 0.99)
    assert_state_dicts_equal(dict(ema.named_parameters()), expected)
    update_ema(ema, model, 0.0)
    assert_state_dicts_equal(ema.state_dict(), model.state_dict())


def test_non_finite_parts_name_the_weights_the_ema_and_the_optimizer_state():
    from util.training import non_finite_parts

    torch.manual_seed(0)
    model = DiT_models["DiT-S/8"](input_size=8, num_classes=3)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = build_optimizer(model, 1e-3)
    model(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.tensor([0, 1])).square().mean().backward()
    optimizer.step()
    assert non_finite_parts(model, ema, optimizer) == []
    with torch.no_grad():
        ema.final_layer.linear.weight[0, 0] = float("nan")
    assert non_finite_parts(model, ema, optimizer) == ["the EMA weights"]
    next(iter(optimizer.state.values()))["exp_avg_sq"].view(-1)[3] = float("inf")
    model.pos_embed.data[0, 0, 0] = float("nan")
    assert non_finite_parts(model, ema, optimizer) == ["the weights", "the EMA weights", "the optimizer state"]


if __name__ == "__main__":
    ddp_worker(sys.argv[1])
