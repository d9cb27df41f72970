"""Any dataset: unconditional training on a folder of images without classes, in any image
mode and shape (--num-classes 1 --class-dropout-prob 0)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import train
from models import DiT_models
from conftest import read_metrics


def mixed_folder(root) -> str:
    """Eight images of assorted modes and shapes directly in root: no class folders."""
    rng = np.random.default_rng(0)
    root.mkdir()
    for k in range(8):
        h, w = rng.integers(50, 120, size=2)
        channels = {0: (), 1: (3,), 2: (4,), 3: (3,)}[k % 4]
        Image.fromarray(rng.integers(0, 256, size=(h, w, *channels), dtype=np.uint8)).save(root / f"img_{k}.png")
    return str(root)


def unconditional_args(data: str, vae, results, *extra: str) -> list[str]:
    return [
        "--data-path", data, "--vae-path", str(vae), "--results-dir", str(results), "--model", "DiT-S/8",
        "--image-size", "64", "--num-classes", "1", "--class-dropout-prob", "0", "--global-batch-size", "4",
        "--num-workers", "0", *extra,
    ]


def test_unconditional_training_on_a_folder_without_classes(tmp_path, tiny_vae_dir):
    data = mixed_folder(tmp_path / "images")
    train.main(unconditional_args(data, tiny_vae_dir, tmp_path / "results", "--max-steps", "2", "--log-every", "1",
                                  "--sample-every", "2", "--sample-steps", "2"))
    experiment = tmp_path / "results" / "000-DiT-S-8"
    ckpt = torch.load(experiment / "checkpoints" / "0000002.pt", weights_only=True)
    # One class and no null label: a label table of one row, and no guidance in the sample grid.
    assert ckpt["ema"]["y_embedder.embedding_table.weight"].shape == (1, 384)
    assert ckpt["args"]["class_dropout_prob"] == 0 and ckpt["args"]["num_classes"] == 1
    DiT_models["DiT-S/8"](input_size=8, num_classes=1, class_dropout_prob=0).load_state_dict(ckpt["ema"])
    assert [m["step"] for m in read_metrics(experiment)] == [1, 2]
    assert all(0.5 < m["loss"] < 2 for m in read_metrics(experiment))
    assert Image.open(experiment / "samples" / "0000002.png").size == (4 * 64 + 5 * 2, 2 * 64 + 3 * 2)

    # The null label cannot appear on resume: one sentence.
    resume = unconditional_args(data, tiny_vae_dir, tmp_path / "results", "--resume", str(experiment / "checkpoints" / "0000002.pt"))
    resume[resume.index("--class-dropout-prob") + 1] = "0.1"
    with pytest.raises(SystemExit, match=r"it was trained with no null label \(--class-dropout-prob 0.1 now\)"):
        train.main(resume)


@pytest.mark.parametrize(
    "flag,value,message",
    [("--num-classes", "0", r"--num-classes must be at least 1"), ("--class-dropout-prob", "1", r"--class-dropout-prob must lie in \[0, 1\), got 1.0")],
)
def test_bad_class_settings_get_one_sentence(tmp_path, tiny_vae_dir, flag, value, message):
    args = unconditional_args(str(tmp_path), tiny_vae_dir, tmp_path / "results")
    args[args.index(flag) + 1] = value
    with pytest.raises(SystemExit, match=message):
        train.main(args)
