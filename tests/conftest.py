"""Shared fixtures: reference vectors and tiny stand-ins (VAE, image folder) built offline."""
from __future__ import annotations

import os
from pathlib import Path

# Tests never touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import numpy as np
import pytest
import torch
from PIL import Image

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).parent.parent


def load_golden(name: str) -> dict:
    """A reference-vector file from tests/data (copied from shared/golden)."""
    return torch.load(DATA / f"{name}.pt", weights_only=True)


def assert_close_to_reference(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    """Max abs error within `rel` x the largest magnitude of the reference (SPEC section 4)."""
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = expected.abs().max().clamp(min=1e-30)
    err = (actual.double() - expected.double()).abs().max() / scale
    assert err <= rel, f"relative error {err.item():.3e} > {rel:.0e}"


def make_tiny_vae(folder: Path) -> Path:
    """A random AutoencoderKL with the real VAE's interface (3 -> 4 channels, 8x downsampling)."""
    from diffusers.models import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
    )
    vae.save_pretrained(folder)
    return folder


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


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory) -> Path:
    return make_tiny_vae(tmp_path_factory.mktemp("tiny_vae"))


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images"))
