"""Shared fixtures: reference vectors and tiny stand-ins (VAE, image folder) built offline."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

# Tests never touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import numpy as np
import pytest
import torch
from diffusers.models import AutoencoderKL
from PIL import Image

import extract_features
import train
from models import DiT_models
from util.sampling import LABEL_TABLE

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).parent.parent


def pytest_report_header(config) -> list[str]:
    """The versions a run tested, in the header: CI installs whatever pip resolves that day."""
    import diffusers
    import torchvision

    return [
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, diffusers {diffusers.__version__}, "
        f"numpy {np.__version__}; CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"{torch.get_num_threads()} threads, CUDA available: {torch.cuda.is_available()}"
    ]


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked `gpu` are skipped, with the reason in the summary, where CUDA is missing."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False); run benchmarks/gpu_checks.sh on one")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def load_golden(name: str) -> dict:
    """A reference-vector file from tests/data: tensors produced by the original DiT code
    (fp32, CPU) for fixed inputs, described in tests/data/README.md."""
    return torch.load(DATA / f"{name}.pt", weights_only=True)


def assert_close_to_reference(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    """Max abs error within `rel` x the largest magnitude of the reference: 1e-5 for single
    calls, 1e-4 for whole sampling loops (the tolerances of tests/data/README.md)."""
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = expected.abs().max().clamp(min=1e-30)
    err = (actual.double() - expected.double()).abs().max() / scale
    assert err <= rel, f"relative error {err.item():.3e} > {rel:.0e}"


def load_golden_model(name: str = "model_tiny") -> tuple:
    """The reference-vector model `name` (model_tiny or model_nosigma) in eval mode, and the file's contents."""
    from models import DiT

    data = load_golden(name)
    model = DiT(**data["config"])
    model.load_state_dict(data["state_dict"], strict=True)
    return model.eval(), data


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Overwrite every trainable weight with N(0, std), zero-initialised layers included, so
    that every path of the model contributes to its output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread, as the scripts' subprocess runs use (OMP_NUM_THREADS=1): the same
    float rounding in and out of process, and fast on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def save_random_vae(folder: Path, seed: int, blocks: int, **config) -> Path:
    """A random AutoencoderKL of `blocks` 8-channel blocks each way (2 ** (blocks - 1) x
    down-sampling), saved as a diffusers folder."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=(8,) * blocks,
        layers_per_block=1,
        norm_num_groups=4,
        **config,
    )
    vae.save_pretrained(folder)
    return folder


def make_tiny_vae(folder: Path) -> Path:
    """A random AutoencoderKL with the real VAE's interface (3 -> 4 channels, 8x downsampling)."""
    return save_random_vae(folder, 0, 4, in_channels=3, out_channels=3, latent_channels=4, sample_size=64)


def make_image_folder(root: Path, classes: int = 3, per_class: int = 8, seed: int = 0) -> Path:
    """ImageFolder tree root/class_k/img_j.png of small random RGB images of varied sizes."""
    rng = np.random.default_rng(seed)
    for k in range(classes):
        (root / f"class_{k}").mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            h, w = rng.integers(64, 96, size=2)
            pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"class_{k}" / f"img_{j}.png")
    return root


def make_unreadable_image_folder(root: Path) -> Path:
    """root/class_0/a.png holding only a PNG signature: a data folder with no readable image."""
    (root / "class_0").mkdir(parents=True)
    (root / "class_0" / "a.png").write_bytes(b"\x89PNG")
    return root


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory) -> Path:
    return make_tiny_vae(tmp_path_factory.mktemp("tiny_vae"))


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images"))


def make_tiny_dit(model: str = "DiT-S/8", input_size: int = 8, num_classes: int = 10, seed: int = 0) -> dict:
    """State dict of a DiT from DiT_models whose every layer matters: the zero-initialised
    adaLN and output layers get small random values, so samples depend on every weight."""
    torch.manual_seed(seed)
    dit = DiT_models[model](input_size=input_size, num_classes=num_classes)
    for param in dit.parameters():
        if not param.any():
            param.data.normal_(0, 0.02)
    return dit.state_dict()


@pytest.fixture(scope="session")
def tiny_dit_ckpts(tmp_path_factory) -> dict:
    """DiT-S/8 for 64 px images (latent 8, one token) with 10 classes, saved twice: as a
    training checkpoint (`ema` holds the weights to sample with; `model` differs from it)
    and as a bare state dict of the same weights."""
    folder = tmp_path_factory.mktemp("tiny_dit")
    ema = make_tiny_dit()
    # Shares every tensor with `ema` but one, so the file stays the size of one model.
    model = dict(ema, **{"final_layer.linear.bias": ema["final_layer.linear.bias"] + 1.0})
    training, bare = folder / "0000010.pt", folder / "bare.pt"
    torch.save({"model": model, "ema": ema, "args": {"model": "DiT-S/8", "image_size": 64}}, training)
    torch.save(ema, bare)
    return {"training": training, "bare": bare, "model": "DiT-S/8", "image_size": 64, "num_classes": 10}


TINY = ["--model", "DiT-S/8", "--image-size", "64", "--num-classes", "3", "--global-batch-size", "8", "--num-workers", "0"]


def train_args(data: Path, vae: Path, results: Path, *extra: str) -> list[str]:
    return ["--data-path", str(data), "--vae-path", str(vae), "--results-dir", str(results), *TINY, *extra]


def run_script(args: list[str], nproc: int = 1) -> subprocess.CompletedProcess:
    """Run a script from the repo root as `python` (nproc 1) or under torchrun (gloo, nproc processes)."""
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))  # a test file run as a worker imports the repo's modules
    if nproc > 1:
        env["OMP_NUM_THREADS"] = "1"  # two processes share the cores
    result = subprocess.run(launcher + args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{args[0]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def read_metrics(experiment: Path) -> list[dict]:
    return [json.loads(line) for line in (experiment / "metrics.jsonl").read_text().splitlines()]


def assert_state_dicts_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@contextmanager
def tmpfs(path: Path, size: str):
    """A tmpfs of `size` mounted at `path`, or a skip where mounting is not allowed (not root)."""
    path.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root; the monkeypatched tests cover the same errors")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def make_read_only(path: Path) -> None:
    """Remount the tmpfs at `path` read-only (root), or take away the write bit (anyone else)."""
    if os.geteuid() == 0:
        subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
    else:
        path.chmod(0o555)


def start_torchrun(args: list[str], nproc: int = 2) -> subprocess.Popen:
    """train.py under torchrun in a session of its own, like a scheduler's job."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train.py", *args]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for_step(experiment: Path, step: int, process: subprocess.Popen, timeout: float = 240) -> None:
    metrics = experiment / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, f"the run ended early:\n{process.stdout.read()[-3000:]}"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= step:
            return
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within {timeout} s")


def worker_pid(torchrun_pid: int, rank: int) -> int:
    """The pid of the train.py process of `rank` that torchrun started."""
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            parent = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
            if parent == torchrun_pid and f"RANK={rank}".encode() in environ:
                return int(pid)
    raise AssertionError(f"no rank {rank} under torchrun {torchrun_pid}")


@pytest.fixture(scope="session")
def three_checkpoints(tmp_path_factory, image_folder, tiny_vae_dir) -> Path:
    """A run with checkpoints at steps 2, 4 and 6 (one process)."""
    results = tmp_path_factory.mktemp("three")
    train.main(train_args(image_folder, tiny_vae_dir, results, "--max-steps", "6", "--log-every", "1", "--ckpt-every", "2"))
    return results


class StandIn:
    """The reference's stand-in model: returns a fixed output and records the timesteps it saw."""

    def __init__(self, output: torch.Tensor):
        self.output = output
        self.seen_t: list[torch.Tensor] = []

    def __call__(self, x, t, **kwargs):
        self.seen_t.append(t)
        return self.output


def extract_args(data: Path, vae: Path, out: Path, *extra: str) -> list[str]:
    return ["--data-path", str(data), "--feature-path", str(out), "--image-size", "64", "--vae-path", str(vae), "--num-workers", "0", *extra]


@pytest.fixture(scope="module")
def store32(tmp_path_factory, image_folder, tiny_vae_dir) -> Path:
    out = tmp_path_factory.mktemp("features") / "f32"
    extract_features.main(extract_args(image_folder, tiny_vae_dir, out, "--batch-size", "24", "--dtype", "float32"))
    return out


def make_other_vae(folder: Path) -> Path:
    """An AutoencoderKL unlike the SD VAE: 8 latent channels, 3 encoder blocks (4x), scale 0.5, shift 0.1."""
    return save_random_vae(folder, 1, 3, latent_channels=8, sample_size=32, scaling_factor=0.5, shift_factor=0.1)


def unconditional_checkpoints(folder) -> dict:
    """DiT-S/8 weights as train.py --num-classes 1 --class-dropout-prob 0 saves them: a label
    table of one row and no null label, as a training checkpoint (with the flags train.py
    stores) and as a bare state dict."""
    ema = make_tiny_dit(num_classes=1)
    ema[LABEL_TABLE] = ema[LABEL_TABLE][:1].clone()  # the null row dropped
    DiT_models["DiT-S/8"](input_size=8, num_classes=1, class_dropout_prob=0).load_state_dict(ema)  # the layout train.py makes
    args = {"model": "DiT-S/8", "image_size": 64, "num_classes": 1, "class_dropout_prob": 0.0}
    training, bare = folder / "0000010.pt", folder / "bare.pt"
    torch.save({"model": ema, "ema": ema, "args": args}, training)
    torch.save(ema, bare)
    return {"training": training, "bare": bare, "model": "DiT-S/8", "image_size": 64, "num_classes": 1}


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/models"
