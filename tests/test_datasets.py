"""util/datasets.py: the digits ImageFolder (layout, counts, pixels, splits), refusal of a
non-empty folder, and CIFAR-10's one-sentence failure offline."""
from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from util import datasets


def read_folder(root: str) -> dict[str, list[str]]:
    return {label: sorted(os.listdir(os.path.join(root, label))) for label in sorted(os.listdir(root))}


def test_digits_folder_layout_counts_and_pixels(tmp_path) -> None:
    root = tmp_path / "digits"
    assert datasets.write_digits(str(root), "train") == 1438
    folder = read_folder(str(root))
    assert list(folder) == [str(k) for k in range(10)]
    digits = load_digits()
    train = np.arange(len(digits.target)) % 5 != 4
    assert [len(names) for names in folder.values()] == np.bincount(digits.target[train]).tolist()
    assert not os.path.exists(str(root) + ".tmp")
    for label, names in folder.items():
        for name in names[:3]:
            index = int(name.removesuffix(".png"))
            assert digits.target[index] == int(label) and train[index]
            pixels = np.asarray(Image.open(root / label / name))
            assert pixels.shape == (8, 8)
            np.testing.assert_array_equal(pixels, np.round(digits.images[index] * 255 / 16))


def test_digits_splits_are_disjoint_and_cover_the_dataset(tmp_path) -> None:
    datasets.write_digits(str(tmp_path / "train"), "train")
    assert datasets.write_digits(str(tmp_path / "test"), "test") == 359
    names = {split: {n for ns in read_folder(str(tmp_path / split)).values() for n in ns} for split in ("train", "test")}
    assert not names["train"] & names["test"]
    assert len(names["train"] | names["test"]) == len(load_digits().target)


def test_digits_upscale_keeps_whole_pixels(tmp_path) -> None:
    datasets.write_digits(str(tmp_path / "d16"), "test", size=16)
    datasets.write_digits(str(tmp_path / "d8"), "test")
    big = np.asarray(Image.open(tmp_path / "d16" / "4" / "00004.png"))
    small = np.asarray(Image.open(tmp_path / "d8" / "4" / "00004.png"))
    assert big.shape == (16, 16)
    np.testing.assert_array_equal(big, small.repeat(2, 0).repeat(2, 1))
    with pytest.raises(datasets.DatasetError, match="multiple of 8"):
        datasets.write_digits(str(tmp_path / "d12"), "test", size=12)


def test_digits_are_deterministic(tmp_path) -> None:
    for name in ("a", "b"):
        datasets.write_digits(str(tmp_path / name), "test")
    first, second = (tmp_path / n / "4" / "00004.png" for n in ("a", "b"))
    assert first.read_bytes() == second.read_bytes()


def test_non_empty_folder_is_refused_and_kept(tmp_path, capsys) -> None:
    root = tmp_path / "full"
    root.mkdir()
    (root / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit, match="already exists and is not empty") as stop:
        datasets.main(["digits", str(root)])
    assert str(stop.value).count(". ") == 0  # one sentence
    assert os.listdir(root) == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    datasets.main(["digits", str(empty), "--split", "test"])
    assert "wrote 359 images" in capsys.readouterr().out


def test_cifar10_offline_says_what_it_tried(tmp_path, monkeypatch) -> None:
    import torchvision.datasets.cifar as cifar

    def offline(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(cifar, "download_and_extract_archive", offline)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(SystemExit) as stop:
        datasets.main(["cifar10", str(tmp_path / "cifar")])
    message = str(stop.value)
    assert "could not download CIFAR-10" in message and "cifar-10-batches-py" in message and "--source PATH" in message
    assert "\n" not in message
    assert not os.path.exists(tmp_path / "cifar")


def test_cifar10_source_without_batches_is_one_sentence(tmp_path) -> None:
    with pytest.raises(SystemExit, match="holds no extracted cifar-10-batches-py") as stop:
        datasets.main(["cifar10", str(tmp_path / "cifar"), "--source", str(tmp_path)])
    assert not os.path.exists(tmp_path / "cifar")
