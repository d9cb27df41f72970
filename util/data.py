"""Training inputs: a resumable sampler with deterministic flips, an image folder that skips
unreadable files, and the memory-mapped store of pre-extracted VAE posteriors.

Every random choice about the data (order and horizontal flips) is a function of
(seed, epoch, index) made by `EpochSampler`, so neither data-loader workers nor a restart
change what a step sees.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler
from torchvision import transforms
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from util.images import center_crop_arr

logger = logging.getLogger("dit")

# Errors PIL raises on missing, truncated or corrupt image files.
UNREADABLE_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
# Give up when this many images in a row cannot be read: the folder itself is broken.
MAX_UNREADABLE_IN_A_ROW = 100

FEATURE_FORMAT = 1
LATENT_CHANNELS = 4
FEATURE_DTYPES = ("float16", "float32")


class EpochSampler(Sampler):
    """Yields (dataset index, flip) for one rank's share of a shuffled epoch.

    The order is a permutation drawn from a generator seeded with seed + epoch (padded by
    repetition to a multiple of the world size and dealt out round-robin, as
    DistributedSampler does); the flip of each index is drawn from the same generator.
    `set_epoch(epoch, start)` skips the first `start` samples of this rank's share, to
    resume mid-epoch.

    Global batch k of G images is order[k*G : (k+1)*G] whatever the world size W (W divides
    G): rank r's share of it is every W-th of those images, and the shares' consecutive runs of
    G / W make up the ranks' batches. Training takes whole global batches only (the padding is
    never used), so a run can resume at the same batch on another number of processes.
    """

    def __init__(self, dataset_size: int, rank: int, world_size: int, seed: int):
        self.dataset_size = dataset_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.samples_per_rank = -(-dataset_size // world_size)
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch = epoch
        self.start = start

    def epoch_items(self, epoch: int) -> list[tuple[int, int]]:
        """This rank's full share of `epoch`, as (index, flip) pairs."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(self.dataset_size, generator=generator)
        flips = torch.randint(0, 2, (self.dataset_size,), generator=generator)
        padding = self.samples_per_rank * self.world_size - self.dataset_size
        order = torch.cat([order, order[:padding]]) if padding else order
        share = order[self.rank :: self.world_size].tolist()
        return [(index, int(flips[index])) for index in share]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self.epoch_items(self.epoch)[self.start :])

    def __len__(self) -> int:
        return self.samples_per_rank - self.start


def to_rgb(image: Image.Image) -> Image.Image:
    """Any image as 8-bit RGB: grayscale is repeated over the channels, 16- and 32-bit grayscale
    is scaled to 8 bits (PIL's own conversion clips it), and transparent pixels are laid over
    white (dropping the alpha channel would show whatever colour they happen to store)."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        pixels = np.asarray(image).astype(np.float64)
        image = Image.fromarray(np.clip(np.round(pixels / 257), 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert("RGB")


def image_files(root: str) -> list[tuple[str, int]]:
    """(path, 0) for the images directly in root, in sorted order: a dataset of one class."""
    names = sorted(name for name in os.listdir(root) if name.lower().endswith(IMG_EXTENSIONS))
    return [(os.path.join(root, name), 0) for name in names if os.path.isfile(os.path.join(root, name))]


class ImageDataset(Dataset):
    """An ImageFolder tree (root/<class>/<image>), or a folder of images without classes (one
    class, for unconditional training), as ADM-center-cropped RGB tensors in [-1, 1].

    Items are addressed by (index, flip); with flip=False no image is mirrored, whatever the
    item asks. An unreadable file is logged and replaced by the next readable image; the item
    reports how many files it skipped so training can count them.
    """

    def __init__(self, root: str, image_size: int, flip: bool = True):
        if not os.path.isdir(root):
            raise ValueError(f"the data folder {root} does not exist")
        try:
            folder = ImageFolder(root, allow_empty=True)
            samples, classes = folder.samples, folder.classes
        except FileNotFoundError:  # no class folders
            samples, classes = image_files(root), [""]
        if not samples:
            raise ValueError(
                f"the data folder {root} holds no images; expected class folders as in {root}/<class>/<image>.png "
                f"or, for one class, images as in {root}/<image>.png"
            )
        self.root = root
        self.samples = samples
        self.classes = classes
        self.image_size = image_size
        self.flip = flip  # the random horizontal flip of the paper's training data (Section 4)
        self.to_tensor = transforms.Compose(
            [transforms.ToTensor(), transforms.Normalize(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5], inplace=True)]
        )

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int, flip: int = 0) -> torch.Tensor | None:
        """Image `index` as a (3, S, S) tensor, mirrored when flip is 1; None if the file is unreadable."""
        path = self.samples[index][0]
        try:
            with Image.open(path) as file:
                image = to_rgb(file)
        except UNREADABLE_IMAGE_ERRORS as error:
            logger.warning(f"skipping unreadable image {path} ({type(error).__name__}: {error})")
            return None
        pixels = self.to_tensor(center_crop_arr(image, self.image_size))
        return pixels.flip(-1) if flip and self.flip else pixels

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int, int]:
        index, flip = item
        for skipped in range(MAX_UNREADABLE_IN_A_ROW):
            candidate = (index + skipped) % len(self)
            pixels = self.load(candidate, flip)
            if pixels is not None:
                return pixels, self.samples[candidate][1], skipped
        raise RuntimeError(f"{MAX_UNREADABLE_IN_A_ROW} images in a row from {self.samples[index][0]} on are unreadable")


# ----------------------------------------------------------------------------------------
# Pre-extracted latents
# ----------------------------------------------------------------------------------------


def vae_encoder_fingerprint(vae: torch.nn.Module) -> str:
    """A short hash of the encoder weights: features fit any VAE with the same encoder, whatever
    its decoder (sd-vae-ft-ema and sd-vae-ft-mse fine-tuned only the decoder)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        if name.startswith(("encoder.", "quant_conv.")):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def feature_array_shape(count: int, latent_size: int) -> tuple[int, ...]:
    """(images, [image, mirrored image], channels, latent, latent)."""
    return (count, 2, LATENT_CHANNELS, latent_size, latent_size)


def feature_bytes_per_image(latent_size: int, dtype: str) -> int:
    """Disk use per image: mean and std for the image and its mirror, plus an int64 label and a done flag."""
    values = 2 * int(np.prod(feature_array_shape(1, latent_size)))
    return values * np.dtype(dtype).itemsize + 8 + 1


def read_feature_meta(path: str) -> dict:
    meta_path = os.path.join(path, "meta.json")
    if not os.path.isfile(meta_path):
        raise ValueError(f"{path} is not a feature folder (no meta.json); make one with extract_features.py")
    with open(meta_path) as f:
        return json.load(f)


def create_feature_store(path: str, meta: dict) -> None:
    """Allocate the arrays (zeros, nothing done), then write meta.json last to mark them complete."""
    os.makedirs(path, exist_ok=True)
    shape = feature_array_shape(meta["count"], meta["latent_size"])
    for name in ("mean", "std"):
        np.lib.format.open_memmap(os.path.join(path, f"{name}.npy"), mode="w+", dtype=meta["dtype"], shape=shape).flush()
    np.lib.format.open_memmap(os.path.join(path, "labels.npy"), mode="w+", dtype=np.int64, shape=(meta["count"],)).flush()
    np.lib.format.open_memmap(os.path.join(path, "done.npy"), mode="w+", dtype=np.bool_, shape=(meta["count"],)).flush()
    tmp_path = os.path.join(path, "meta.json.tmp")
    with open(tmp_path, "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp_path, os.path.join(path, "meta.json"))


def open_feature_arrays(path: str, writable: bool = False) -> dict[str, np.ndarray]:
    """Memory-map mean, std, labels and done (read-only unless writable)."""
    mode = "r+" if writable else "r"
    return {name: np.load(os.path.join(path, f"{name}.npy"), mmap_mode=mode) for name in ("mean", "std", "labels", "done")}


class FeatureDataset(Dataset):
    """Pre-extracted VAE posteriors addressed by (index, flip), like ImageDataset.

    Items are (mean, std, label, skipped) with mean and std of shape (4, L, L) in the stored
    dtype; images that were unreadable at extraction (label -1) are replaced by the next good one.
    """

    def __init__(self, path: str):
        self.path = path
        self.meta = read_feature_meta(path)
        arrays = open_feature_arrays(path)
        done = int(np.count_nonzero(arrays["done"]))
        if done < self.meta["count"]:
            raise ValueError(
                f"the feature folder {path} is incomplete ({done} of {self.meta['count']} images); "
                f"rerun extract_features.py with the same arguments to finish it"
            )
        self.labels = np.array(arrays["labels"])
        if not (self.labels >= 0).any():
            raise ValueError(f"the feature folder {path} holds no readable images")
        self.arrays: dict[str, np.ndarray] | None = None  # mapped lazily, once per worker process

    def __len__(self) -> int:
        return len(self.labels)

    def __getstate__(self) -> dict:
        # Workers map the files themselves; pickling a memmap would copy the whole array.
        return {**self.__dict__, "arrays": None}

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        if self.arrays is None:
            self.arrays = open_feature_arrays(self.path)
        index, flip = item
        skipped = 0
        while self.labels[index] < 0:
            index = (index + 1) % len(self)
            skipped += 1
        mean = torch.from_numpy(np.array(self.arrays["mean"][index, flip]))
        std = torch.from_numpy(np.array(self.arrays["std"][index, flip]))
        return mean, std, int(self.labels[index]), skipped
