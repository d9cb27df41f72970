"""Training inputs: a resumable sampler with deterministic flips, an image folder that skips
unreadable files, and the memory-mapped store of pre-extracted autoencoder posteriors.

Every random choice about the data (order and horizontal flips) is a function of
(seed, epoch, index) made by `EpochSampler`, so neither data-loader workers nor a restart
change what a step sees. An unreadable image is replaced by the next readable one, a function
of the file list and of which files are readable, so every rank and every resume agree.
Both datasets have a `fingerprint()` of their content, which a resume compares instead of paths.
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

from util.files import atomic_open
from util.images import center_crop_arr
from util.vae import SD_LATENT_CHANNELS, SD_VAE_DESCRIPTION

logger = logging.getLogger("dit")

# Errors PIL raises on missing, truncated or corrupt image files.
UNREADABLE_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)

FEATURE_FORMAT = 1
FEATURE_DTYPES = ("float16", "float32")
FEATURE_ARRAYS = ("mean", "std", "labels", "done")
CHECKSUM_CHUNK_BYTES = 16 * 2**20
NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


class FeatureStoreError(ValueError):
    """A feature folder whose arrays do not match its meta.json, in one sentence."""


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


def folder_listed_twice(samples: list[tuple[str, int]]) -> tuple[str, str] | None:
    """Two folder paths of `samples` that are one folder on disk, or None.

    ImageFolder follows folder links, so a link back into the tree (class/loop -> class) lists
    the same images again under ever longer paths, up to the system's limit of 40 links."""
    seen: dict[str, str] = {}
    for folder in dict.fromkeys(os.path.dirname(path) for path, _ in samples):
        first = seen.setdefault(os.path.realpath(folder), folder)
        if first != folder:
            return first, folder
    return None


def read_rgb(path: str) -> Image.Image:
    """The image at `path` as RGB; raises one of UNREADABLE_IMAGE_ERRORS when it cannot be read."""
    with Image.open(path) as file:
        return to_rgb(file)


class ImageDataset(Dataset):
    """An ImageFolder tree (root/<class>/<image>), or a folder of images without classes (one
    class, for unconditional training), as ADM-center-cropped RGB tensors in [-1, 1].

    Items are addressed by (index, flip); with flip=False no image is mirrored, whatever the
    item asks. An unreadable file is logged once and replaced by the next readable image (in
    list order, wrapping around), however many in a row are unreadable; the item reports how
    many files it skipped so training can count them.
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
        twice = folder_listed_twice(samples)
        if twice:
            raise ValueError(
                f"the data folder {root} lists the folder {twice[0]} again as {twice[1]} (a folder link loops back into the tree); "
                f"remove that link"
            )
        self.root = root
        self.samples = samples
        self.classes = classes
        self.image_size = image_size
        self.flip = flip  # the random horizontal flip of the paper's training data (Section 4)
        self.to_tensor = transforms.Compose(
            [transforms.ToTensor(), transforms.Normalize(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5], inplace=True)]
        )
        self.unreadable: set[int] = set()  # indices found unreadable (in this process)
        self.check_some_image_is_readable()
        self.content_fingerprint: str | None = None  # computed on first use

    def __len__(self) -> int:
        return len(self.samples)

    def check_some_image_is_readable(self) -> None:
        """Raise ValueError unless one of the files opens as an image (usually the first does)."""
        first_error = None
        for path, _ in self.samples:
            try:
                read_rgb(path)
                return
            except UNREADABLE_IMAGE_ERRORS as error:
                first_error = first_error or f"{path}: {type(error).__name__}: {error}"
        raise ValueError(f"none of the {len(self)} image files in the data folder {self.root} can be read (the first, {first_error})")

    def fingerprint(self) -> str:
        """A hash of the sorted relative paths and file sizes: equal for a copy of the folder or
        a link to it, different when a file is added, removed, renamed or rewritten to another size."""
        if self.content_fingerprint is None:
            digest = hashlib.sha256()
            for relative, path in sorted((os.path.relpath(path, self.root), path) for path, _ in self.samples):
                digest.update(f"{relative}\t{os.path.getsize(path)}\n".encode())
            self.content_fingerprint = f"files-sha256:{digest.hexdigest()}"
        return self.content_fingerprint

    def load(self, index: int, flip: int = 0) -> torch.Tensor | None:
        """Image `index` as a (3, S, S) tensor, mirrored when flip is 1; None if the file is unreadable."""
        if index in self.unreadable:
            return None
        path = self.samples[index][0]
        try:
            image = read_rgb(path)
        except UNREADABLE_IMAGE_ERRORS as error:
            self.unreadable.add(index)
            logger.warning(f"skipping unreadable image {path} ({type(error).__name__}: {error})")
            return None
        pixels = self.to_tensor(center_crop_arr(image, self.image_size))
        return pixels.flip(-1) if flip and self.flip else pixels

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int, int]:
        index, flip = item
        for skipped in range(len(self)):
            candidate = (index + skipped) % len(self)
            pixels = self.load(candidate, flip)
            if pixels is not None:
                return pixels, self.samples[candidate][1], skipped
        raise RuntimeError(f"none of the {len(self)} images in {self.root} can be read any more")


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


def feature_array_shape(count: int, latent_size: int, channels: int, views: int) -> tuple[int, ...]:
    """(images, views, channels, latent, latent): views are [image, mirrored image], or [image]."""
    return (count, views, channels, latent_size, latent_size)


def feature_bytes_per_image(latent_size: int, dtype: str, channels: int = SD_LATENT_CHANNELS, views: int = 2) -> int:
    """Disk use per image: mean and std of each view, plus an int64 label and a done flag
    (by default the SD VAE's 4 channels, for the image and its mirror)."""
    values = 2 * int(np.prod(feature_array_shape(1, latent_size, channels, views)))
    return values * np.dtype(dtype).itemsize + 8 + 1


def feature_autoencoder(meta: dict) -> dict:
    """The store's Autoencoder.describe(); a store without one was made with an SD VAE."""
    return meta.get("autoencoder", {**SD_VAE_DESCRIPTION, "vae": meta.get("vae", SD_VAE_DESCRIPTION["vae"])})


def feature_views(meta: dict) -> int:
    """2 for a store of each image and its mirror (the default), 1 for unflipped images only."""
    return 2 if meta.get("flip", True) else 1


def read_feature_meta(path: str) -> dict:
    meta_path = os.path.join(path, "meta.json")
    if not os.path.isfile(meta_path):
        raise ValueError(f"{path} is not a feature folder (no meta.json); make one with extract_features.py")
    try:
        with open(meta_path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise FeatureStoreError(f"the feature folder {path} is damaged: meta.json does not parse ({error})") from None


def expected_feature_arrays(meta: dict) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """The shape and dtype of each array of a store described by `meta`."""
    channels = feature_autoencoder(meta)["latent_channels"]
    moments = feature_array_shape(meta["count"], meta["latent_size"], channels, feature_views(meta))
    count = (meta["count"],)
    return {
        "mean": (moments, np.dtype(meta["dtype"])),
        "std": (moments, np.dtype(meta["dtype"])),
        "labels": (count, np.dtype(np.int64)),
        "done": (count, np.dtype(np.bool_)),
    }


def write_feature_meta(path: str, meta: dict) -> None:
    """meta.json, replaced whole: written last, it marks the store's arrays as allocated."""
    with atomic_open(os.path.join(path, "meta.json")) as f:
        json.dump(meta, f, indent=1)


def create_feature_array(path: str, name: str, meta: dict) -> None:
    """Write array `name` of the store anew: zeros (nothing done), of the shape meta.json gives it."""
    shape, dtype = expected_feature_arrays(meta)[name]
    np.lib.format.open_memmap(os.path.join(path, f"{name}.npy"), mode="w+", dtype=dtype, shape=shape).flush()


def create_feature_store(path: str, meta: dict) -> None:
    """Allocate the arrays (zeros, nothing done), then write meta.json last to mark them complete."""
    os.makedirs(path, exist_ok=True)
    for name in FEATURE_ARRAYS:
        create_feature_array(path, name, meta)
    write_feature_meta(path, meta)


def npy_header(file: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, dtype and the offset of the data of the .npy file `file` (ValueError if it has no header)."""
    with open(file, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = NPY_HEADER_READERS.get(version)
        if read_header is None:
            raise ValueError(f"unknown .npy format version {version}")
        shape, fortran_order, dtype = read_header(f)
        if fortran_order:
            raise ValueError("it is stored in Fortran order")
        return shape, dtype, f.tell()


def feature_array_problem(path: str, name: str, shape: tuple[int, ...], dtype: np.dtype) -> str | None:
    """What is wrong with array `name` of the store at `path` (missing, another shape or type,
    cut short or too long), in a few words; None when its header and size are as expected."""
    file = os.path.join(path, f"{name}.npy")
    if not os.path.isfile(file):
        return f"{name}.npy is missing"
    try:
        found_shape, found_dtype, offset = npy_header(file)
    except (ValueError, OSError, EOFError) as error:
        return f"{name}.npy has no valid .npy header ({error})"
    if (found_shape, found_dtype) != (shape, dtype):
        return f"{name}.npy holds a {found_dtype} array of shape {found_shape}, not {dtype} {shape}"
    size, expected = os.path.getsize(file), offset + int(np.prod(shape)) * dtype.itemsize
    if size != expected:
        return f"{name}.npy is {size:,} bytes long, not {expected:,} ({'cut short' if size < expected else 'too long'})"
    return None


def feature_store_problems(path: str, meta: dict) -> dict[str, str]:
    """Array name -> what is wrong with it, for every array of the store that does not match meta.json."""
    problems = {name: feature_array_problem(path, name, *layout) for name, layout in expected_feature_arrays(meta).items()}
    return {name: problem for name, problem in problems.items() if problem}


def check_feature_store(path: str, meta: dict) -> None:
    """Raise FeatureStoreError unless every array's header and file size match meta.json: a
    short file must never be mapped (numpy's "r+" mapping silently extends it with zeros)."""
    problems = feature_store_problems(path, meta)
    if problems:
        raise FeatureStoreError(
            f"the feature folder {path} is damaged: {'; '.join(problems.values())}; "
            f"rerun extract_features.py with the same arguments to redo the damaged arrays"
        )


def open_feature_arrays(path: str, writable: bool = False) -> dict[str, np.ndarray]:
    """Memory-map mean, std, labels and done (read-only unless writable), once their sizes are checked."""
    check_feature_store(path, read_feature_meta(path))
    mode = "r+" if writable else "r"
    return {name: np.load(os.path.join(path, f"{name}.npy"), mmap_mode=mode) for name in FEATURE_ARRAYS}


def feature_store_checksum(path: str) -> str:
    """The SHA-256 of the store's four array files, in order."""
    digest = hashlib.sha256()
    for name in FEATURE_ARRAYS:
        with open(os.path.join(path, f"{name}.npy"), "rb") as f:
            while chunk := f.read(CHECKSUM_CHUNK_BYTES):
                digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


class FeatureDataset(Dataset):
    """Pre-extracted autoencoder posteriors addressed by (index, flip), like ImageDataset.

    Items are (mean, std, label, skipped) with mean and std of shape (C, L, L) in the stored
    dtype; images that were unreadable at extraction (label -1) are replaced by the next good one.
    A store without mirrored copies serves the unflipped image whatever the flip. `autoencoder`
    is the store's Autoencoder.describe(), whose scale and shift turn the moments into latents.
    """

    def __init__(self, path: str):
        self.path = path
        self.meta = read_feature_meta(path)  # open_feature_arrays checks every array against it
        self.autoencoder = feature_autoencoder(self.meta)
        self.views = feature_views(self.meta)
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

    def fingerprint(self) -> str | None:
        """The checksum extract_features.py wrote when the store was complete (None for stores made without one)."""
        return self.meta.get("checksum")

    def __getstate__(self) -> dict:
        # Workers map the files themselves; pickling a memmap would copy the whole array.
        return {**self.__dict__, "arrays": None}

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        if self.arrays is None:
            self.arrays = open_feature_arrays(self.path)
        index, flip = item
        view = flip if self.views == 2 else 0
        skipped = 0
        while self.labels[index] < 0:
            index = (index + 1) % len(self)
            skipped += 1
        mean = torch.from_numpy(np.array(self.arrays["mean"][index, view]))
        std = torch.from_numpy(np.array(self.arrays["std"][index, view]))
        return mean, std, int(self.labels[index]), skipped
