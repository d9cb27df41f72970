"""Gradient accumulation (--grad-accum-steps): the gradient of the mean loss over the global
batch, whatever its split into micro-batches and processes; DDP communicates once per step.

Run as a script under torchrun, this file is the worker of the two-process test.
"""
from __future__ import annotations

import sys

import pytest
import torch

import train
from util.training import accumulated_step, build_optimizer
from conftest import randomize_, read_metrics, run_script, train_args
from diffusion import create_diffusion
from models import DiT_models

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


def test_two_processes_with_accumulation_equal_one_large_batch(tmp_path):
    out = tmp_path / "ddp.pt"
    run_script(["tests/test_train_accumulation.py", str(out)], nproc=2)
    _, grads, _ = step_on_splits(tiny_model(), [fixed_batch()])
    result = torch.load(out, weights_only=True)
    before_first, before_second, after_step = result["calls"]
    assert before_first == before_second == 0 < after_step  # no_sync: all-reduces after the last micro-batch only
    assert result["grads"].keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(result["grads"][name], grads[name], rtol=1e-4, atol=1e-7, msg=name)


def test_train_py_with_accumulation_records_the_split(tmp_path, image_folder, tiny_vae_dir):
    args = train_args(image_folder, tiny_vae_dir, tmp_path, "--max-steps", "2", "--log-every", "1", "--grad-accum-steps", "4")
    run_script(["train.py", *args])
    experiment = tmp_path / "000-DiT-S-8"
    metrics = read_metrics(experiment)
    assert [m["step"] for m in metrics] == [1, 2]  # logs per optimizer step, not per micro-batch
    assert all(m["images_per_sec"] == pytest.approx(8 * m["steps_per_sec"]) for m in metrics)
    ckpt = torch.load(experiment / "checkpoints" / "0000002.pt", weights_only=True)
    assert (ckpt["step"], ckpt["epoch_step"], ckpt["grad_accum_steps"], ckpt["micro_batch_size"]) == (2, 2, 4, 2)
    assert "global batch 8 = 2 images x 4 micro-batches x 1 process(es)" in (experiment / "log.txt").read_text()


def test_global_batch_must_divide_by_processes_times_accumulation(image_folder):
    args = train.parse_args(["--data-path", str(image_folder), "--global-batch-size", "8", "--grad-accum-steps", "3"])
    with pytest.raises(SystemExit, match=r"--global-batch-size 8 is not divisible by the world size 2 times --grad-accum-steps 3"):
        train.validate_args(args, world_size=2)
    args.grad_accum_steps = 0
    with pytest.raises(SystemExit, match=r"--grad-accum-steps must be at least 1"):
        train.validate_args(args, world_size=1)


if __name__ == "__main__":
    ddp_worker(sys.argv[1])
