"""benchmarks/benchmark.py: the FLOP count behind MFU, the variant names, the machine named in
every report, the largest-batch search and the profile."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import diffusers
import pytest
import torch

from conftest import REPO

from benchmarks import benchmark
from benchmarks.benchmark import (
    batch_fits, forward_macs, hardware, hardware_line, largest_fitting_batch, parse_variant, peak_tflops_of, train_mfu,
)
from util.precision import cpu_has_native_bf16, resolve_precision


# Forward GFLOPs per image as the DiT paper counts them (multiply-adds), at 256 px unless noted.
@pytest.mark.parametrize(
    "model,image_size,paper_gmacs",
    [("DiT-XL/2", 256, 118.6), ("DiT-XL/2", 512, 524.6), ("DiT-S/2", 256, 6.06), ("DiT-B/4", 256, 5.56), ("DiT-S/8", 256, 0.36)],
)
def test_forward_macs_match_the_paper(model, image_size, paper_gmacs):
    # The paper rounds to 1 or 2 decimals; allow that rounding or 0.1%, whichever is larger.
    assert forward_macs(model, image_size) / 1e9 == pytest.approx(paper_gmacs, rel=1e-3, abs=0.005)


def test_variant_names():
    assert parse_variant("reference") == {"precision": "fp32", "compile": False, "plain-attn": True, "loop-opt": True, "ckpt": False}
    assert parse_variant("bf16+compile") == {"precision": "bf16", "compile": True, "plain-attn": False, "loop-opt": False, "ckpt": False}
    assert parse_variant("auto+ckpt") == {"precision": "auto", "compile": False, "plain-attn": False, "loop-opt": False, "ckpt": True}
    with pytest.raises(SystemExit, match=r"bad variant 'bf16\+fast'"):
        parse_variant("bf16+fast")


# ---------------------------------------------------------------- the machine

def test_hardware_record_agrees_with_torch():
    info = hardware(torch.device("cpu"))
    assert info["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert info["cpu_capability"] in ("DEFAULT", "VSX", "ZVECTOR", "NO AVX", "AVX2", "AVX512", "SVE256")
    assert info["cpu_native_bf16"] == cpu_has_native_bf16()
    assert info["threads"] == torch.get_num_threads()
    assert (info["torch"], info["diffusers"]) == (torch.__version__, diffusers.__version__)
    assert "gpu" not in info
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            assert f"model name\t: {info['cpu']}" in f.read()
    assert info["cpu"]

    line = hardware_line(info)
    native = "native bf16" if cpu_has_native_bf16() else "no native bf16"
    assert line.startswith(f"machine: CPU {info['cpu']} ({info['cpu_capability']}, {native}), {info['threads']} threads")
    assert line.endswith(f"; torch {torch.__version__}, diffusers {diffusers.__version__}")


@pytest.mark.parametrize("capability,native", [((9, 0), "native bf16"), ((7, 0), "no native bf16")])
def test_hardware_record_names_the_gpu(monkeypatch, capability, native):
    # Faked CUDA queries: the GPU branch is checked on machines without one too.
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(total_memory=80 * 2**30))
    info = hardware(torch.device("cuda", 0))
    assert info["gpu"] == "NVIDIA H100 80GB HBM3" and info["compute_capability"] == f"{capability[0]}.{capability[1]}"
    assert info["gpu_native_bf16"] == (capability >= (8, 0)) and info["gpu_memory_gib"] == 80.0
    assert info["cuda"] == torch.version.cuda
    expected = f"; GPU NVIDIA H100 80GB HBM3 (compute capability {capability[0]}.{capability[1]}, {native}, 80.0 GiB), CUDA {torch.version.cuda}; torch"
    assert expected in hardware_line(info)


@pytest.mark.slow
def test_report_names_the_machine_and_resolves_auto(tmp_path):
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "benchmarks.benchmark", "--model", "DiT-S/8", "--image-size", "64",
        "--batch-size", "2", "--variants", "auto", "--measure", "train", "--warmup", "0", "--repeats", "1",
        "--device", "cpu", "--out-dir", str(out), "--json", str(tmp_path / "extra.json"),
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "benchmark.json").read_text())
    assert report == json.loads((tmp_path / "extra.json").read_text())
    assert report["hardware"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert report["hardware"]["threads"] == 1  # the child's OMP_NUM_THREADS
    (record,) = report["variants"]
    chosen, note = resolve_precision("auto", torch.device("cpu"))
    assert record["variant"] == "auto" and record["precision"] == chosen and record["precision_note"] == note
    assert record["train_batch_size"] == 2 and record["train_images_per_s"] > 0
    table = (out / "benchmark.md").read_text().splitlines()
    assert table[0] == hardware_line(report["hardware"]) and table[0] in result.stdout
    assert any(line.startswith(f"| auto ({chosen}) | 2 |") for line in table)


# ---------------------------------------------------------------- MFU and the largest batch

def test_mfu_arithmetic():
    macs = forward_macs("DiT-XL/2", 256)
    # A worked example: 625 img/s x 711.6 GFLOP per training image on an H100's 989 TFLOP/s is 45%.
    assert train_mfu(625, 118.6e9, 989.0) == pytest.approx(625 * 711.6e9 / 989e12) == pytest.approx(0.4497, abs=1e-4)
    # The original release on A100s: about 26 img/s per GPU, about 6% of 312 TFLOP/s.
    assert train_mfu(26, macs, 312.0) == pytest.approx(0.0593, abs=5e-4)
    assert benchmark.sample_mfu(1.0, macs, 989.4) == pytest.approx(250 * 2 * 2 * macs / 989.4e12)


@pytest.mark.parametrize(
    "name,peak",
    [("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.4),
     ("NVIDIA A100-SXM4-80GB", 312.0), ("Tesla V100-SXM2-16GB", None)],
)
def test_peak_by_gpu_name(name, peak):
    assert peak_tflops_of(name) == peak


@pytest.mark.parametrize("largest,start,limit,expected", [(77, 8, 4096, 72), (77, 64, 4096, 72), (20, 64, 4096, 16),
                                                          (5000, 8, 100, 96), (5000, 32, 1024, 1024), (7, 8, 4096, 0)])
def test_largest_fitting_batch_with_a_fake_out_of_memory(largest, start, limit, expected):
    tried = []

    def run(batch: int) -> None:
        tried.append(batch)
        if batch > largest:
            raise torch.OutOfMemoryError(f"CUDA out of memory (fake): batch {batch}")

    assert largest_fitting_batch(lambda b: batch_fits(run, b), start, limit, 8) == expected
    assert all(b % 8 == 0 and b <= limit for b in tried)
    assert len(tried) == len(set(tried)) <= 2 * len(bin(limit))  # doubling, then bisection


def test_other_errors_are_not_taken_for_out_of_memory():
    def run(batch: int) -> None:
        raise RuntimeError("a real bug")

    with pytest.raises(RuntimeError, match="a real bug"):
        batch_fits(run, 8)


def test_profile_names_where_the_time_goes(tmp_path):
    a, b = torch.randn(64, 64), torch.randn(64, 64)
    path = tmp_path / "profile.txt"
    benchmark.profile_step(lambda: torch.softmax(a @ b, dim=-1), torch.device("cpu"), str(path), "a title")
    lines = path.read_text().splitlines()
    assert lines[0] == "a title" and lines[2].startswith("self cpu time ") and "matmul" in lines[2]
    assert any("aten::mm" in line for line in lines[3:])


# ---------------------------------------------------------------- the GPU checks' tooling

@pytest.mark.slow
def test_gpu_marker_selects_the_gpu_tests_which_skip_without_cuda():
    def pytest_run(*args: str) -> str:
        result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=REPO,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result.stdout

    collected = pytest_run("-m", "gpu", "--collect-only", "-q", "tests/test_gpu.py", "tests/test_benchmark.py")
    selected = [line for line in collected.splitlines() if "::" in line]
    assert len(selected) >= 10 and all(line.startswith("tests/test_gpu.py::") for line in selected)
    assert "tests/test_gpu.py::test_train_from_images_tf32_resumes_bitwise_with_the_cuda_rng_state" in selected
    if not torch.cuda.is_available():  # CPU CI: reported as skipped, with the reason
        report = pytest_run("-rs", "tests/test_gpu.py")
        assert f"{len(selected)} skipped" in report and "needs a CUDA GPU" in report


@pytest.mark.slow
@pytest.mark.parametrize("script", ["gpu_checks.sh", "fetch_gpu_wheels.sh"])
def test_gpu_scripts_parse(script):
    result = subprocess.run(["bash", "-n", str(REPO / "benchmarks" / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
