"""benchmarks/quickstart.py: the digit score (real held-out digits score their classifier's
accuracy, noise scores near chance) and the table, plot and grid writers."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks import quickstart


@pytest.fixture(scope="module")
def classifier():
    return quickstart.fit_digit_classifier()


def test_real_held_out_digits_score_the_reference_accuracy(classifier) -> None:
    model, reference = classifier
    assert 0.97 <= reference <= 1.0
    images, labels = quickstart.real_digits_as_images("test")
    assert images.shape == (359, 3, 8, 8) and images.min() >= -1 and images.max() <= 1
    assert quickstart.score_samples(model, images, labels) == pytest.approx(reference, abs=0.01)
    # The same digits nearest-upscaled to 16 px reduce back to the same features.
    big = images.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    np.testing.assert_allclose(quickstart.digit_features(big), quickstart.digit_features(images), atol=1e-5)


def test_noise_scores_near_chance(classifier) -> None:
    model, _ = classifier
    generator = torch.Generator().manual_seed(0)
    noise = torch.rand(1000, 3, 8, 8, generator=generator) * 2 - 1
    labels = torch.arange(10).repeat_interleave(100)
    assert abs(quickstart.score_samples(model, noise, labels) - 0.1) < 0.04


def test_table_lists_every_checkpoint(tmp_path) -> None:
    rows = [dict(seconds=61.2, step=40, accuracy=0.5, relative=0.51), dict(seconds=120.0, step=80, accuracy=0.95, relative=0.97)]
    path = tmp_path / "quickstart.md"
    quickstart.write_table(rows, "machine: CPU Test", 0.98, str(path))
    text = path.read_text()
    assert text.startswith("machine: CPU Test\n") and "0.9800" in text
    assert "| 61 | 40 | 0.500 | 0.510 |" in text and "| 120 | 80 | 0.950 | 0.970 |" in text
    assert quickstart.time_to(rows, 0.9) == 120.0 and quickstart.time_to(rows, 0.5) == 61.2


def test_plot_draws_axes_and_the_line(tmp_path) -> None:
    path = tmp_path / "plot.png"
    quickstart.plot_series([0, 60, 120], [0.1, 0.5, 0.9], str(path), "title", "seconds", "score")
    pixels = np.asarray(Image.open(path).convert("RGB"))
    assert pixels.shape == (400, 640, 3)
    line = (pixels == (31, 119, 180)).all(axis=2)
    assert line.sum() > 100
    rows = np.flatnonzero(line.any(axis=1))
    assert rows.max() - rows.min() > 200  # the line climbs from 0.1 to 0.9 of the axis
    black = (pixels == 0).all(axis=2)
    assert black[350, 60:620].all() and black[30:300, 60].all()  # the x and y axes (the line starts at y = 0.1)
    assert black[352:356, 60].all() and black[350, 55:60].all()  # a tick on each at 0


def test_digit_grid_has_one_upscaled_row_per_class(tmp_path) -> None:
    images = torch.full((100, 3, 8, 8), -1.0)
    images[10:20] = 1.0  # row 1 white
    path = tmp_path / "grid.png"
    quickstart.save_digit_grid(images, 10, str(path))
    grid = np.asarray(Image.open(path))
    assert grid.shape == (364, 364)  # 10 digits of 32 px, 11 grey lines of 4 px
    assert (grid[40:72, 4:36] == 255).all() and (grid[40:72, 328:360] == 255).all()
    assert (grid[4:36, 4:36] == 0).all() and (grid[76:108, 4:36] == 0).all()
    assert (grid[:4] == quickstart.GRID_GAP_GREY).all() and (grid[36:40] == quickstart.GRID_GAP_GREY).all()


def test_samples_come_per_class_in_range_and_repeat_with_the_seed() -> None:
    torch.manual_seed(0)
    model = quickstart.DiT_models["DiT-S/8"](input_size=8, in_channels=3, num_classes=2).eval()
    images, labels = quickstart.sample_classes(model, per_class=2)
    again, _ = quickstart.sample_classes(model, per_class=2)
    assert images.shape == (4, 3, 8, 8) and labels.tolist() == [0, 0, 1, 1]
    assert images.min() >= -1 and images.max() <= 1
    assert torch.equal(images, again)


def test_checkpoints_are_thinned_to_one_per_interval(tmp_path) -> None:
    folder = tmp_path / "000-DiT-S-4" / "checkpoints"
    folder.mkdir(parents=True)
    start = 1_000_000.0
    for step, seconds in [(10, 20), (20, 40), (30, 65), (40, 90), (50, 130)]:
        path = folder / f"{step:07d}.pt"
        path.write_bytes(b"")
        os.utime(path, (start + seconds, start + seconds))
    (folder / ".tmp-abc.pt").write_bytes(b"")  # a checkpoint being written
    kept: list[str] = []
    quickstart.thin_checkpoints(str(tmp_path), kept, start, keep_every=60)
    assert [os.path.basename(p) for p in kept] == ["0000030.pt", "0000050.pt"]
    assert sorted(os.listdir(folder)) == [".tmp-abc.pt", "0000030.pt", "0000050.pt"]
