"""Small real datasets written out as ImageFolder trees (DIR/<class>/<image>.png) for train.py.

  python -m util.datasets digits DIR [--split train|test] [--size 8]
  python -m util.datasets cifar10 DIR [--source PATH]

digits: scikit-learn's bundled 8x8 handwritten digits (1,797 greyscale images, 10 classes,
no download). Pixel values 0..16 become 0..255 (v * 255 / 16, rounded). Image i belongs to
the test split when i % 5 == 4 (359 images, 21 to 52 per class), to the train split
otherwise (1,438 images); the quick start trains on `train` and scores samples with a
classifier fitted on `train` and checked on `test`. --size upscales with nearest neighbour
(whole pixels stay whole, so downsampling by averaging recovers the 8x8 digit exactly).

cifar10: CIFAR-10's 50,000 training images through torchvision, downloaded unless --source
names a folder holding the extracted cifar-10-batches-py.

The folder is written to DIR.tmp and renamed to DIR when complete; an existing non-empty
DIR is refused. File names are <class>/<index>.png with the dataset's own index, so the
same command always writes the same bytes.
"""
from __future__ import annotations

import argparse
import os
import shutil
from typing import Iterable

import numpy as np
from PIL import Image

DIGITS_TEST_EVERY = 5  # image i is held out when i % 5 == 4
SPLITS = ("train", "test")


class DatasetError(ValueError):
    """A dataset could not be written; the message says what was tried."""


def digits_test_mask(count: int) -> np.ndarray:
    """True for the held-out digits: every fifth image, the last of each group of five."""
    return np.arange(count) % DIGITS_TEST_EVERY == DIGITS_TEST_EVERY - 1


def load_digits_split(split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images (N, 8, 8) float in 0..16, labels (N,), dataset indices (N,)) of one split."""
    from sklearn.datasets import load_digits

    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    digits = load_digits()
    held_out = digits_test_mask(len(digits.target))
    keep = held_out if split == "test" else ~held_out
    return digits.images[keep], digits.target[keep], np.flatnonzero(keep)


def digits_to_uint8(images: np.ndarray) -> np.ndarray:
    """Digit pixels 0..16 -> 0..255."""
    return np.round(np.asarray(images, dtype=np.float64) * 255 / 16).astype(np.uint8)


def check_empty_target(root: str) -> None:
    if os.path.isdir(root) and os.listdir(root):
        raise DatasetError(f"{root} already exists and is not empty; choose a new folder or empty it first")
    if os.path.exists(root) and not os.path.isdir(root):
        raise DatasetError(f"{root} exists and is not a folder; choose a new folder")


def write_image_folder(root: str, images: Iterable[tuple[np.ndarray, int, int]]) -> int:
    """Write (pixels uint8 HxW or HxWx3, label, index) as root/<label>/<index>.png, through
    root.tmp renamed at the end. Returns the number of images written."""
    check_empty_target(root)
    staging = root.rstrip(os.sep) + ".tmp"
    shutil.rmtree(staging, ignore_errors=True)  # a run that died half-way
    count = 0
    for pixels, label, index in images:
        folder = os.path.join(staging, str(label))
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(pixels).save(os.path.join(folder, f"{index:05d}.png"))
        count += 1
    if os.path.isdir(root):
        os.rmdir(root)  # empty (checked above); rename needs it gone
    os.replace(staging, root)
    return count


def write_digits(root: str, split: str = "train", size: int = 8) -> int:
    """The digits of `split` as an ImageFolder of greyscale PNGs, `size` px (a multiple of 8)."""
    if size < 8 or size % 8:
        raise DatasetError(f"digit images are 8x8 and upscale by whole factors; {size} px is not a multiple of 8")
    images, labels, indices = load_digits_split(split)
    factor = size // 8
    pixels = digits_to_uint8(images).repeat(factor, axis=1).repeat(factor, axis=2)
    return write_image_folder(root, zip(pixels, labels.tolist(), indices.tolist()))


def open_cifar10(source: str | None):
    """torchvision's CIFAR-10 training split, from `source` or downloaded to a cache folder."""
    from torchvision.datasets import CIFAR10

    if source is not None:
        try:
            return CIFAR10(source, train=True, download=False)
        except RuntimeError as error:
            raise DatasetError(f"{source} holds no extracted cifar-10-batches-py that torchvision can read ({error})") from error
    cache = os.path.join(os.path.expanduser("~"), ".cache", "cifar10")
    try:
        return CIFAR10(cache, train=True, download=True)
    except (OSError, RuntimeError) as error:
        raise DatasetError(
            f"could not download CIFAR-10 through torchvision into {cache} ({type(error).__name__}: {error}); "
            "offline, give a local copy: the folder that holds the extracted cifar-10-batches-py"
        ) from error


def write_cifar10(root: str, source: str | None = None) -> int:
    """CIFAR-10's training images as an ImageFolder of 32x32 RGB PNGs, class folders 0..9."""
    check_empty_target(root)  # before a download
    dataset = open_cifar10(source)
    return write_image_folder(root, ((pixels, int(label), index) for index, (pixels, label) in enumerate(zip(dataset.data, dataset.targets))))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a small real dataset as an ImageFolder for train.py.")
    sub = parser.add_subparsers(dest="dataset", required=True)
    digits = sub.add_parser("digits", help="scikit-learn's 8x8 digits (offline)")
    digits.add_argument("root", help="the folder to write (new or empty)")
    digits.add_argument("--split", choices=SPLITS, default="train", help="train: 4 of every 5 images; test: the 5th")
    digits.add_argument("--size", type=int, default=8, help="side in pixels, a multiple of 8 (nearest-neighbour upscaling)")
    cifar = sub.add_parser("cifar10", help="CIFAR-10's training split through torchvision")
    cifar.add_argument("root", help="the folder to write (new or empty)")
    cifar.add_argument("--source", default=None, help="a folder holding the extracted cifar-10-batches-py (no download)")
    args = parser.parse_args(argv)
    try:
        if args.dataset == "digits":
            count = write_digits(args.root, args.split, args.size)
        else:
            count = write_cifar10(args.root, args.source)
    except DatasetError as error:
        hint = " (pass --source PATH)" if args.dataset == "cifar10" and "download" in str(error) else ""
        raise SystemExit(f"{error}{hint}") from None
    print(f"wrote {count} images to {args.root}")


if __name__ == "__main__":
    main()
