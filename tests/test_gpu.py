"""The GPU code paths, run for real on a CUDA GPU (each test is skipped, and reported as such,
without one): train.py under torchrun with nccl from images and from features, in tf32, bf16
and with --compile; resume equal to an uninterrupted run, CUDA RNG state included; no
host-device synchronisation in plain training steps; sample.py's starting latent and
repeatability; sample_ddp.py's independence of --per-proc-batch-size; bf16 and tf32 losses
against fp32.

  python -m pytest -m gpu -v          (benchmarks/gpu_checks.sh runs this, then the GPU benchmark)

The models are tiny (DiT-S/8 or DiT-S/2 on 64 px images, the tiny VAE of conftest), so that the
whole file runs in a few minutes, most of it process start-up and one compilation.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from copy import deepcopy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train
from util.batches import batch_to_device
from util.resume import restore_rng_state
from util.training import RunningStats, build_optimizer, training_step, update_ema
from conftest import REPO, make_tiny_dit
from diffusion import create_diffusion
from util.distributed import cleanup_distributed, max_over_ranks
from models import DiT_models
from util.precision import autocast, configure_precision, grad_scaler

pytestmark = pytest.mark.gpu

TINY = ["--model", "DiT-S/8", "--image-size", "64", "--num-classes", "3", "--global-batch-size", "8", "--num-workers", "0"]
# train.py under deterministic algorithms (cuBLAS needs a fixed workspace for them). warn_only:
# an op without a deterministic CUDA kernel warns instead of failing, and then the bitwise
# comparisons below say whether it mattered.
DETERMINISTIC_TRAIN = """import sys
import torch
torch.use_deterministic_algorithms(True, warn_only=True)
import train
train.main(sys.argv[1:])
"""


def run(args: list[str], torchrun: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """A script from the repo root under `torchrun --nproc_per_node=1` (nccl), or as plain python."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"] if torchrun else [sys.executable]
    full_env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", CUBLAS_WORKSPACE_CONFIG=":4096:8", **(env or {}))
    result = subprocess.run(launcher + args, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, f"{args[0]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def train_args(results: Path, vae: Path, *extra: str) -> list[str]:
    return ["--vae-path", str(vae), "--results-dir", str(results), *TINY, "--log-every", "1", *extra]


def read_losses(experiment: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (experiment / "metrics.jsonl").read_text().splitlines()]


def assert_equal_state(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for key in a:
        diff = (a[key].double() - b[key].double()).abs().max().item() if a[key].is_floating_point() else None
        assert torch.equal(a[key], b[key]), f"{what}[{key}] differs (max abs difference {diff})"


# ---------------------------------------------------------------- train.py under torchrun (nccl)

@pytest.mark.slow
def test_train_from_images_tf32_resumes_bitwise_with_the_cuda_rng_state(tmp_path, image_folder, tiny_vae_dir):
    """5 steps in one go, and 3 steps then --resume auto to 5 (across an epoch boundary: 24
    images, batch 8), both under deterministic algorithms: every weight, optimizer state,
    loss and both RNG states (CPU and CUDA) at step 5 are bitwise equal."""
    script = tmp_path / "deterministic_train.py"
    script.write_text(DETERMINISTIC_TRAIN)
    data = ["--data-path", str(image_folder), "--precision", "tf32"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    run([str(script), *data, *train_args(whole, tiny_vae_dir, "--max-steps", "5")])
    run([str(script), *data, *train_args(split, tiny_vae_dir, "--max-steps", "3", "--resume", "auto")])
    resumed = run([str(script), *data, *train_args(split, tiny_vae_dir, "--max-steps", "5", "--resume", "auto")])
    assert "resuming from" in resumed.stdout + resumed.stderr

    ours = torch.load(split / "000-DiT-S-8" / "checkpoints" / "0000005.pt", weights_only=True)
    reference = torch.load(whole / "000-DiT-S-8" / "checkpoints" / "0000005.pt", weights_only=True)
    assert_equal_state(ours["model"], reference["model"], "model")
    assert_equal_state(ours["ema"], reference["ema"], "ema")
    for index, state in reference["opt"]["state"].items():
        assert_equal_state(ours["opt"]["state"][index], state, f"optimizer state {index}")
    (rng,), (reference_rng,) = ours["rng"], reference["rng"]
    assert rng["cuda"] is not None and torch.equal(rng["cuda"], reference_rng["cuda"])  # trained on the GPU
    assert torch.equal(rng["cpu"], reference_rng["cpu"])
    assert read_losses(split / "000-DiT-S-8") == read_losses(whole / "000-DiT-S-8")


def test_cuda_rng_state_is_saved_and_restored():
    from util.distributed import DistInfo, rng_states_of_all_ranks

    device = torch.device("cuda")
    torch.manual_seed(3)
    torch.randn(5, device=device)
    checkpoint = {"world_size": 1, "rng": rng_states_of_all_ranks(device)}  # what train.py saves
    expected = torch.randn(1000, device=device)
    torch.manual_seed(99)
    torch.randn(7, device=device)
    restore_rng_state(checkpoint, 0, DistInfo(rank=0, local_rank=0, world_size=1, device=device), seed=0)
    assert torch.equal(torch.randn(1000, device=device), expected)


# ---------------------------------------------------------------- no host-device sync

def plain_steps(model: torch.nn.Module, device: torch.device, precision: str):
    """One training iteration as train.py runs it between log steps: batch to the GPU (from
    pinned memory, as the loader gives it), training step, EMA, running loss."""
    raw = model.module if hasattr(model, "module") else model  # DDP wraps the model
    ema = deepcopy(raw).requires_grad_(False)
    optimizer = build_optimizer(raw, 1e-4)
    diffusion = create_diffusion("")
    stats = RunningStats(device)
    scaler = grad_scaler(precision, device)
    mean, std = torch.randn(8, 4, 8, 8).pin_memory(), torch.rand(8, 4, 8, 8).pin_memory()
    batch = [mean, std, torch.arange(8).remainder(10).pin_memory(), torch.zeros(8, dtype=torch.bool)]

    def step() -> None:
        latents, labels, skipped = batch_to_device(batch, None, True, device)
        stats.add_skipped(skipped)
        loss, _, skipped_step = training_step(model, diffusion, optimizer, latents, labels, precision, False, scaler)
        update_ema(ema, raw, 0.9999)
        stats.add(loss, skipped_step)
        max_over_ranks(0)  # the loop's stop-signal agreement: a CPU collective beside nccl

    return step, stats


def run_without_sync(step, warmup: int, steps: int = 3) -> None:
    for _ in range(warmup):  # first calls copy the diffusion tables to the GPU, build AdamW state, ...
        step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(steps):
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_plain_training_steps_do_not_synchronise(precision):
    device = torch.device("cuda")
    configure_precision(precision)
    try:
        torch.manual_seed(0)
        step, stats = plain_steps(DiT_models["DiT-S/2"](input_size=8, num_classes=10).to(device), device, precision)
        run_without_sync(step, warmup=2)
    finally:
        configure_precision("fp32")
    assert torch.isfinite(stats.loss) and stats.steps == 5


def test_plain_ddp_training_steps_do_not_synchronise():
    """Under DDP in a one-process nccl group. DDP records runtime statistics (with CUDA event
    timing) in its first 10 iterations, so the checked steps come after 11."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    device = torch.device("cuda", 0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=device)
    try:
        torch.manual_seed(0)
        model = DDP(DiT_models["DiT-S/2"](input_size=8, num_classes=10).to(device), device_ids=[device])
        step, stats = plain_steps(model, device, "fp32")
        run_without_sync(step, warmup=11)
    finally:
        cleanup_distributed()  # also forgets max_over_ranks' gloo group
    assert torch.isfinite(stats.loss) and stats.steps == 14


# ---------------------------------------------------------------- sampling

def sample_args(ckpts: dict, vae_dir: Path, out: Path) -> list[str]:
    return [
        "--model", ckpts["model"], "--image-size", str(ckpts["image_size"]), "--num-classes", str(ckpts["num_classes"]),
        "--ckpt", str(ckpts["training"]), "--vae-path", str(vae_dir), "--num-sampling-steps", "10",
        "--class-labels", "0", "1", "2", "3", "9", "--seed", "7", "--out", str(out),
    ]


@pytest.mark.slow
def test_sample_py_draws_the_reference_latent_and_repeats_itself(tmp_path, monkeypatch, tiny_dit_ckpts, tiny_vae_dir):
    import sample

    starts = []
    real_denoise = sample.denoise

    def spy(model, diffusion, z, *args, **kwargs):
        starts.append(z.clone())
        return real_denoise(model, diffusion, z, *args, **kwargs)

    monkeypatch.setattr(sample, "denoise", spy)
    try:
        sample.main(sample_args(tiny_dit_ckpts, tiny_vae_dir, tmp_path / "in_process.png"))
    finally:
        configure_precision("fp32")
    (z,) = starts
    # The original's draw: a fresh seed, then the CUDA generator's first numbers.
    torch.manual_seed(7)
    assert z.device.type == "cuda" and torch.equal(z, torch.randn(5, 4, 8, 8, device="cuda"))

    run(["sample.py", *sample_args(tiny_dit_ckpts, tiny_vae_dir, tmp_path / "script.png")], torchrun=False)
    first = np.asarray(Image.open(tmp_path / "in_process.png"))
    second = np.asarray(Image.open(tmp_path / "script.png"))
    assert first.shape == (2 * 64 + 3 * 2, 4 * 64 + 5 * 2, 3) and first.std() > 0
    assert np.array_equal(first, second)


@pytest.mark.slow
def test_sample_ddp_npz_does_not_depend_on_the_per_process_batch(tmp_path, tiny_dit_ckpts, tiny_vae_dir):
    """40 images in blocks of --micro-batch-size 8, taken 8 or 32 at a time by the one process."""
    arrays, files = [], []
    for per_proc in (8, 32):
        sample_dir = tmp_path / f"per-proc-{per_proc}"
        run(["sample_ddp.py", "--model", "DiT-S/8", "--image-size", "64", "--num-classes", "10",
             "--ckpt", str(tiny_dit_ckpts["training"]), "--vae-path", str(tiny_vae_dir), "--num-sampling-steps", "10",
             "--num-fid-samples", "40", "--micro-batch-size", "8", "--per-proc-batch-size", str(per_proc),
             "--sample-dir", str(sample_dir)])
        (npz,) = sample_dir.glob("*.npz")
        files.append(npz.read_bytes())
        with np.load(npz) as data:
            arrays.append(data["arr_0"])
    assert arrays[0].shape == (40, 64, 64, 3) and arrays[0].dtype == np.uint8 and arrays[0].std() > 0
    assert np.array_equal(arrays[0], arrays[1]) and files[0] == files[1]


# ---------------------------------------------------------------- precision

@pytest.mark.parametrize("precision,rel", [("tf32", 5e-3), ("bf16", 3e-2)])
def test_low_precision_loss_is_close_to_fp32(precision, rel):
    """The training loss of one batch (same timesteps, noise and label drops) in tf32 (10-bit
    mantissa products) and bf16 (8-bit), against fp32: DiT-S/2 with 64 tokens, every layer
    random, so that all of them count."""
    device = torch.device("cuda")
    model = DiT_models["DiT-S/2"](input_size=16, num_classes=10)
    model.load_state_dict(make_tiny_dit("DiT-S/2", input_size=16, num_classes=10))
    model.to(device).train()
    diffusion = create_diffusion("")
    generator = torch.Generator(device=device).manual_seed(0)
    latents = torch.randn(32, 4, 16, 16, device=device, generator=generator)
    labels = torch.randint(0, 10, (32,), device=device, generator=generator)

    def loss(chosen: str) -> float:
        configure_precision(chosen)
        torch.manual_seed(1)  # the same timesteps, noise and label drops for every precision
        t = torch.randint(0, diffusion.num_timesteps, (32,), device=device)

        def forward(x, t, y):
            with autocast(chosen, device):
                return model(x, t, y).float()

        with torch.no_grad():
            return diffusion.training_losses(forward, latents, t, dict(y=labels))["loss"].mean().item()

    try:
        reference, low = loss("fp32"), loss(precision)
        again = loss("fp32")
    finally:
        configure_precision("fp32")
    assert again == reference  # the comparison is of precision alone
    assert 0.1 < reference < 10
    assert low == pytest.approx(reference, rel=rel)


# ---------------------------------------------------------------- last: the one compilation (the longest test)

@pytest.mark.slow
def test_train_from_features_bf16_with_compile_matches_eager(tmp_path, image_folder, tiny_vae_dir):
    """Features extracted on the GPU; train.py in bf16, compiled and eager: the same draws
    (compile keeps random ops eager), so the losses agree to bf16 rounding, 2% relative."""
    features = tmp_path / "features"
    run(["extract_features.py", "--data-path", str(image_folder), "--feature-path", str(features), "--image-size", "64",
         "--vae-path", str(tiny_vae_dir), "--num-workers", "0", "--batch-size", "8"])
    common = ["--feature-path", str(features), "--precision", "bf16", "--max-steps", "4"]
    run([str(REPO / "train.py"), *common, *train_args(tmp_path / "eager", tiny_vae_dir)])
    run([str(REPO / "train.py"), *common, *train_args(tmp_path / "compiled", tiny_vae_dir, "--compile")])
    eager, compiled = read_losses(tmp_path / "eager" / "000-DiT-S-8"), read_losses(tmp_path / "compiled" / "000-DiT-S-8")
    assert len(eager) == len(compiled) == 4 and all(0.1 < loss < 10 for loss in eager)
    assert compiled == pytest.approx(eager, rel=2e-2)
