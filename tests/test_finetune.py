"""--init-from: fine-tuning starts from a checkpoint's model and EMA weights, with a new
optimizer at step 0; another class count gets a new label table, anything else must fit."""
from __future__ import annotations

import pytest
import torch

import train
from conftest import make_tiny_dit
from conftest import train_args

TABLE = "y_embedder.embedding_table.weight"


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> dict:
    """A train.py-like checkpoint of DiT-S/8 (3 classes) whose model and EMA differ, with an
    optimizer state that a fine-tuning run must not take; and a bare state dict for 10 classes."""
    folder = tmp_path_factory.mktemp("source")
    ema = make_tiny_dit(num_classes=3, seed=1)
    model = {name: tensor + 0.01 for name, tensor in ema.items()}
    opt = {"state": {0: {"step": torch.tensor(100.0)}}, "param_groups": []}
    torch.save({"model": model, "ema": ema, "opt": opt, "step": 100, "args": {}}, folder / "0000100.pt")
    torch.save(make_tiny_dit(num_classes=10, seed=2), folder / "ten_classes.pt")
    return {"training": folder / "0000100.pt", "model": model, "ema": ema, "ten_classes": folder / "ten_classes.pt"}


def fine_tune(tmp_path, image_folder, tiny_vae_dir, init_from, *extra) -> tuple[dict, str]:
    # lr 0 and EMA decay 1: the weights after one step are the initial ones.
    args = train_args(image_folder, tiny_vae_dir, tmp_path, "--max-steps", "1", "--lr", "0", "--ema-decay", "1",
                      "--init-from", str(init_from), *extra)
    train.main(args)
    experiment = tmp_path / "000-DiT-S-8"
    return torch.load(experiment / "checkpoints" / "0000001.pt", weights_only=True), (experiment / "log.txt").read_text()


@pytest.mark.slow
def test_init_from_loads_model_and_ema_but_not_optimizer_or_step(tmp_path, source, image_folder, tiny_vae_dir):
    ckpt, log = fine_tune(tmp_path, image_folder, tiny_vae_dir, source["training"])
    for name in source["ema"]:
        assert torch.equal(ckpt["model"][name], source["model"][name]), name
        assert torch.equal(ckpt["ema"][name], source["ema"][name]), name
    steps = {state["step"].item() for state in ckpt["opt"]["state"].values()}
    assert ckpt["step"] == 1 and steps == {1}  # a new optimizer, counting from 0
    assert f"initialised the model and EMA weights from {source['training']}" in log
    assert "label table" not in log


@pytest.mark.slow
def test_another_class_count_gets_a_new_label_table(tmp_path, source, image_folder, tiny_vae_dir):
    weights = torch.load(source["ten_classes"], weights_only=True)
    ckpt, log = fine_tune(tmp_path, image_folder, tiny_vae_dir, source["ten_classes"])
    assert weights[TABLE].shape == (11, 384) and ckpt["model"][TABLE].shape == (4, 384)  # 3 classes + null label
    assert not torch.equal(ckpt["model"][TABLE], weights[TABLE][:4])
    assert torch.equal(ckpt["ema"][TABLE], ckpt["model"][TABLE])
    for name in weights:
        if name != TABLE:
            assert torch.equal(ckpt["model"][name], weights[name]) and torch.equal(ckpt["ema"][name], weights[name]), name
    relabel = [line for line in log.splitlines() if "label table" in line]
    assert len(relabel) == 1 and "has 11 rows, this run needs 4 (--num-classes 3 + the null label)" in relabel[0]


@pytest.mark.slow
def test_a_checkpoint_of_another_model_is_refused(tmp_path, image_folder, tiny_vae_dir):
    torch.save(make_tiny_dit("DiT-S/4", num_classes=3), tmp_path / "s4.pt")
    with pytest.raises(SystemExit, match=r"--init-from .*s4.pt does not fit the model: 4 shape mismatches: pos_embed"):
        fine_tune(tmp_path / "run", image_folder, tiny_vae_dir, tmp_path / "s4.pt")
    assert not (tmp_path / "run").exists()  # refused before any work


def test_a_missing_source_gets_one_sentence_before_any_work(tmp_path, image_folder, tiny_vae_dir):
    with pytest.raises(SystemExit, match=r"--init-from .*nope.pt does not exist; pass a checkpoint file or a released name \(DiT-XL-2-256x256.pt"):
        fine_tune(tmp_path, image_folder, tiny_vae_dir, tmp_path / "nope.pt")
    assert not (tmp_path / "000-DiT-S-8").exists()


@pytest.mark.slow
def test_init_from_another_image_size_recomputes_pos_embed(tmp_path, image_folder, tiny_vae_dir):
    from models import sincos_2d

    weights = make_tiny_dit(num_classes=3, seed=3)  # 64 px: 8x8 latents, one token
    torch.save(weights, tmp_path / "64px.pt")
    ckpt, log = fine_tune(tmp_path / "run", image_folder, tiny_vae_dir, tmp_path / "64px.pt", "--image-size", "128")
    fresh = sincos_2d(384, 2).unsqueeze(0)  # 16x16 latents: 2x2 tokens of DiT-S/8
    assert torch.equal(ckpt["model"]["pos_embed"], fresh) and torch.equal(ckpt["ema"]["pos_embed"], fresh)
    for name in weights:
        if name != "pos_embed":
            assert torch.equal(ckpt["model"][name], weights[name]) and torch.equal(ckpt["ema"][name], weights[name]), name
    lines = [line for line in log.splitlines() if "pos_embed recomputed" in line]
    assert len(lines) == 1 and lines[0].endswith(
        f"--init-from {tmp_path / '64px.pt'} was trained at 64 px (8x8 latents): pos_embed recomputed for 16x16 latents"
    )


@pytest.mark.slow
def test_a_refusal_names_what_the_weights_were_made_for(tmp_path, image_folder, tiny_vae_dir):
    torch.save(make_tiny_dit("DiT-S/4", num_classes=3), tmp_path / "s4.pt")
    with pytest.raises(SystemExit, match=r"\(the weights are those of DiT-S/4 at 8x8 latents, 4 channels, 4 label rows \(3 classes and the null label, or 4 without\)\)$"):
        fine_tune(tmp_path / "run", image_folder, tiny_vae_dir, tmp_path / "s4.pt")
