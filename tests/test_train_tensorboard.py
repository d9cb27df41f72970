"""--tensorboard: the metrics.jsonl fields and the sample grids as TensorBoard events."""
from __future__ import annotations

import io
import sys

import numpy as np
import pytest
from PIL import Image

import train
from conftest import read_metrics, train_args


def test_tensorboard_events_hold_the_metrics_and_the_grids(tmp_path, image_folder, tiny_vae_dir):
    from tensorboard.backend.event_processing import event_accumulator  # in requirements-test.txt
    train.main(train_args(image_folder, tiny_vae_dir, tmp_path, "--max-steps", "2", "--log-every", "1",
                          "--sample-every", "2", "--sample-steps", "2", "--tensorboard"))
    experiment = tmp_path / "000-DiT-S-8"
    events = event_accumulator.EventAccumulator(str(experiment / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()

    metrics = read_metrics(experiment)
    fields = [name for name in metrics[0] if name != "step"]
    assert sorted(events.Tags()["scalars"]) == sorted(f"train/{name}" for name in fields)
    for name in fields:
        scalars = events.Scalars(f"train/{name}")
        assert [s.step for s in scalars] == [1, 2]
        assert [s.value for s in scalars] == pytest.approx([m[name] for m in metrics], rel=1e-6)

    [image] = events.Images("samples")
    grid = Image.open(io.BytesIO(image.encoded_image_string))
    png = Image.open(experiment / "samples" / "0000002.png")
    assert image.step == 2 and grid.size == png.size
    # The same pixels as the saved PNG, up to rounding to 8 bits by two routes.
    difference = np.abs(np.asarray(grid.convert("RGB"), dtype=int) - np.asarray(png.convert("RGB"), dtype=int))
    assert difference.max() <= 1


def test_off_by_default_and_one_sentence_without_the_package(tmp_path, image_folder, tiny_vae_dir, monkeypatch):
    assert train.parse_args(["--data-path", "x"]).tensorboard is False
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    with pytest.raises(SystemExit, match=r"^--tensorboard needs the tensorboard package, which is not installed: pip install tensorboard$"):
        train.main(train_args(image_folder, tiny_vae_dir, tmp_path, "--max-steps", "1", "--tensorboard"))
    assert not (tmp_path / "000-DiT-S-8").exists()
