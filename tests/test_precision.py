"""Precision that follows the hardware: `--precision auto`, the warning for emulated bf16/fp16,
and fp16 training with dynamic loss scaling (on the CPU, with the capability probes faked)."""
from __future__ import annotations


import pytest
import torch

from util import precision
import train
from util.training import build_optimizer, training_step
from diffusion import create_diffusion
from models import DiT_models
from conftest import assert_state_dicts_equal, read_metrics, run_script, train_args

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


@pytest.fixture
def fake_cpu(monkeypatch):
    """fake_cpu(bf16=..., fp16=...) makes torch's CPU probes report those instructions."""

    def fake(bf16: bool, fp16: bool = False) -> None:
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: bf16)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_fp16_supported", lambda: fp16)
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AMX" if bf16 else "AVX2")

    return fake


@pytest.fixture
def fake_gpu(monkeypatch):
    """fake_gpu(major, minor) makes CUDA device 0 report that compute capability."""

    def fake(major: int, minor: int) -> None:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, minor))
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: f"Fake GPU sm_{major}{minor}")

    return fake


def test_auto_chooses_fp32_on_a_cpu_without_native_bf16(fake_cpu):
    fake_cpu(bf16=False)
    chosen, message = precision.resolve_precision("auto", CPU)
    assert chosen == "fp32"
    assert message == "--precision auto chose fp32: this CPU (AVX2) has no native bf16"


def test_auto_chooses_bf16_on_a_cpu_with_amx(fake_cpu):
    fake_cpu(bf16=True)
    assert precision.resolve_precision("auto", CPU) == ("bf16", "--precision auto chose bf16: this CPU (AMX) computes bf16 natively")


@pytest.mark.parametrize("capability,expected", [((9, 0), "bf16"), ((8, 0), "bf16"), ((7, 5), "tf32"), ((7, 0), "tf32")])
def test_auto_on_gpus_follows_the_compute_capability(fake_gpu, capability, expected):
    fake_gpu(*capability)
    chosen, message = precision.resolve_precision("auto", CUDA)
    assert chosen == expected
    assert message.startswith(f"--precision auto chose {expected}: Fake GPU sm_{capability[0]}{capability[1]}")


def test_explicit_bf16_without_native_bf16_warns_once_with_the_alternative(fake_cpu, fake_gpu):
    fake_cpu(bf16=False)
    chosen, message = precision.resolve_precision("bf16", CPU)
    assert chosen == "bf16"  # honoured, but the user is told
    assert message.startswith("warning: this CPU (AVX2) has no native bf16, so --precision bf16 is emulated and much slower")
    assert message.endswith("use --precision auto or fp32") and "\n" not in message
    fake_gpu(7, 0)  # a V100
    assert precision.resolve_precision("bf16", CUDA)[1].endswith("use --precision auto or tf32")
    assert precision.resolve_precision("fp16", CUDA) == ("fp16", None)


def test_no_warning_where_the_hardware_has_it(fake_cpu, fake_gpu):
    fake_cpu(bf16=True, fp16=True)
    for name in ("fp32", "tf32", "bf16", "fp16"):
        assert precision.resolve_precision(name, CPU) == (name, None)
    fake_cpu(bf16=False, fp16=False)
    assert precision.resolve_precision("fp16", CPU)[1].startswith("warning: this CPU (AVX2) has no native fp16")
    fake_gpu(8, 0)
    assert precision.resolve_precision("bf16", CUDA) == ("bf16", None)


def test_probes_agree_with_torch_on_this_machine():
    native = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    assert precision.has_native_bf16(CPU) == native
    assert precision.resolve_precision("auto", CPU)[0] == ("bf16" if native else "fp32")


def test_auto_must_be_resolved_before_configuring():
    with pytest.raises(ValueError, match="resolve 'auto' first"):
        precision.configure_precision("auto")
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        precision.resolve_precision("fp8", CPU)


@pytest.mark.slow
def test_train_logs_what_auto_chose_and_why(fake_cpu, tmp_path, image_folder, tiny_vae_dir):
    fake_cpu(bf16=False)
    train.main(train_args(image_folder, tiny_vae_dir, tmp_path, "--max-steps", "1", "--precision", "auto"))
    experiment = tmp_path / "000-DiT-S-8"
    assert "--precision auto chose fp32: this CPU (AVX2) has no native bf16" in (experiment / "log.txt").read_text()
    saved = torch.load(experiment / "checkpoints" / "0000001.pt", weights_only=True)
    assert saved["args"]["precision"] == "fp32"  # the checkpoint records what ran


def test_sample_warns_about_emulated_bf16(fake_cpu, tmp_path, tiny_dit_ckpts, tiny_vae_dir, capsys):
    import sample

    fake_cpu(bf16=False)
    out = tmp_path / "grid.png"
    sample.main([
        "--model", tiny_dit_ckpts["model"], "--image-size", "64", "--num-classes", "10", "--ckpt", str(tiny_dit_ckpts["bare"]),
        "--vae-path", str(tiny_vae_dir), "--num-sampling-steps", "2", "--class-labels", "1", "--precision", "bf16", "--out", str(out),
    ])
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == [
        "warning: this CPU (AVX2) has no native bf16, so --precision bf16 is emulated and much slower than fp32 "
        "(about 25x on an AVX2 CPU); use --precision auto or fp32"
    ]
    assert out.is_file()


# ---------------------------------------------------------------- fp16 with loss scaling

def tiny_training(seed: int = 0):
    torch.manual_seed(seed)
    model = DiT_models["DiT-S/8"](input_size=8, num_classes=3)
    return model, build_optimizer(model, 1e-4), create_diffusion("")


@pytest.mark.slow
def test_fp16_overflow_skips_the_step_and_lowers_the_scale():
    model, optimizer, diffusion = tiny_training()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**60)  # scaled fp16 gradients overflow
    before = [p.detach().clone() for p in model.parameters()]
    latents, labels = torch.randn(8, 4, 8, 8), torch.arange(8) % 3
    loss, _, skipped = training_step(model, diffusion, optimizer, latents, labels, "fp16", scaler=scaler)
    assert torch.isfinite(loss) and bool(skipped)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))  # no update
    assert scaler.get_scale() == 2.0**59  # backed off by half

    scaler.update(2.0**10)  # a scale at which the gradients fit in fp16
    _, norm, skipped = training_step(model, diffusion, optimizer, latents, labels, "fp16", True, scaler)
    assert not bool(skipped) and torch.isfinite(norm)
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))


@pytest.mark.slow
def test_fp16_losses_stay_close_to_fp32():
    losses = {}
    for name in ("fp32", "fp16"):
        model, optimizer, diffusion = tiny_training()
        scaler = precision.grad_scaler(name, CPU)
        torch.manual_seed(1)
        losses[name] = [
            training_step(model, diffusion, optimizer, torch.randn(8, 4, 8, 8), torch.arange(8) % 3, name, scaler=scaler)[0].item()
            for _ in range(3)
        ]
    assert losses["fp16"] == pytest.approx(losses["fp32"], rel=5e-3)  # fp16 keeps 11 bits, bf16 8


@pytest.mark.slow
def test_fp16_run_counts_skipped_steps_and_resumes_the_scaler_exactly(tmp_path, image_folder, tiny_vae_dir):
    args = train_args(image_folder, tiny_vae_dir, tmp_path / "a", "--log-every", "1", "--precision", "fp16")
    run_script(["train.py", *args, "--max-steps", "4"])
    straight = tmp_path / "a" / "000-DiT-S-8"
    metrics = read_metrics(straight)
    assert all(m["skipped_steps"] == 0 and m["loss_scale"] == 2.0**16 for m in metrics)
    reference = torch.load(straight / "checkpoints" / "0000004.pt", weights_only=True)
    assert reference["scaler"]["scale"] == 2.0**16 and reference["scaler"]["_growth_tracker"] == 4

    resumed_args = train_args(image_folder, tiny_vae_dir, tmp_path / "b", "--log-every", "1", "--precision", "fp16")
    run_script(["train.py", *resumed_args, "--max-steps", "2"])
    run_script(["train.py", *resumed_args, "--max-steps", "4", "--resume", "auto"])
    resumed = torch.load(tmp_path / "b" / "000-DiT-S-8" / "checkpoints" / "0000004.pt", weights_only=True)
    assert resumed["scaler"] == reference["scaler"]  # the growth tracker continued from 2, not from 0
    assert_state_dicts_equal(resumed["model"], reference["model"])
    assert [m["loss"] for m in read_metrics(tmp_path / "b" / "000-DiT-S-8")] == [m["loss"] for m in metrics]
