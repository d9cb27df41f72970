"""checkpoint.py: atomic writes, safe reads, clear errors on bad files."""
from __future__ import annotations

import argparse
import os

import numpy as np
import pytest
import torch

from util.checkpoints import load_checkpoint, model_weights, save_checkpoint


def test_round_trip_and_no_temp_files_left(tmp_path):
    path = tmp_path / "ckpt" / "0000010.pt"
    state = {"model": {"w": torch.arange(4.0)}, "ema": {"w": torch.ones(4)}, "args": {"lr": 1e-4}, "step": 10}
    save_checkpoint(state, str(path))
    loaded = load_checkpoint(str(path))
    assert torch.equal(loaded["model"]["w"], state["model"]["w"]) and loaded["step"] == 10
    assert os.listdir(path.parent) == ["0000010.pt"]
    assert model_weights(loaded) is loaded["ema"]
    assert model_weights(loaded["model"]) is loaded["model"]


def test_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"w": torch.zeros(2)}, str(path))

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_checkpoint({"w": Unpicklable()}, str(path))
    assert torch.equal(load_checkpoint(str(path))["w"], torch.zeros(2))
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_truncated_file_gets_one_clear_sentence(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"w": torch.randn(1000)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"could not read checkpoint .*ckpt\.pt: the file is corrupt"):
        load_checkpoint(str(path))


@pytest.mark.parametrize("seed", range(20))
def test_random_bytes_get_one_clear_sentence(tmp_path, seed):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(np.random.default_rng(seed).integers(0, 256, size=4096, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError, match="could not read checkpoint"):
        load_checkpoint(str(path))


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"args": argparse.Namespace(lr=1.0)}, path)  # not loadable with weights_only
    with pytest.raises(ValueError, match="holds more than tensors and plain values"):
        load_checkpoint(str(path))


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(str(tmp_path / "nope.pt"))


def test_missing_entries_and_setting_differences():
    from util.resume import missing_entries, setting_differences

    assert missing_entries({"model": 1, "step": 2}, ("model", "ema", "step")) == ["ema"]
    assert missing_entries([1, 2], ("model",)) == ["model"]  # not a dict: lacks everything
    saved, now = {"image_size": 256, "global_batch_size": 8}, {"image_size": 256, "global_batch_size": 4}
    assert setting_differences(saved, now, ("image_size", "global_batch_size")) == ["--global-batch-size 8 (now 4)"]
    assert setting_differences(saved, saved, ("image_size", "global_batch_size")) == []
