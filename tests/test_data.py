"""util/data.py: the resumable sampler, the image folder that skips unreadable files, the feature store."""
from __future__ import annotations

import hashlib
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DistributedSampler
from torchvision.datasets import ImageFolder

from conftest import make_image_folder
from util.data import (
    EpochSampler,
    FeatureDataset,
    FeatureStoreError,
    ImageDataset,
    create_feature_store,
    feature_autoencoder,
    feature_bytes_per_image,
    open_feature_arrays,
    to_rgb,
)
from util.images import center_crop_arr


@pytest.mark.parametrize("size,world_size", [(24, 1), (24, 2), (10, 4)])
def test_sampler_order_is_the_reference_distributed_sampler(size, world_size):
    # The reference shuffles with DistributedSampler(seed=global_seed); ours must give the same order.
    for rank in range(world_size):
        ours = EpochSampler(size, rank, world_size, seed=7)
        theirs = DistributedSampler(range(size), num_replicas=world_size, rank=rank, shuffle=True, seed=7)
        for epoch in (0, 3):
            ours.set_epoch(epoch)
            theirs.set_epoch(epoch)
            assert [index for index, _ in ours] == list(theirs)


def test_sampler_flips_depend_only_on_seed_epoch_and_index():
    one = EpochSampler(40, 0, 1, seed=1)
    flips = dict(one.epoch_items(2))
    for rank in range(3):
        for index, flip in EpochSampler(40, rank, 3, seed=1).epoch_items(2):
            assert flips[index] == flip
    assert set(flips.values()) == {0, 1}
    assert dict(one.epoch_items(3)) != flips
    assert dict(EpochSampler(40, 0, 1, seed=2).epoch_items(2)) != flips


def test_sampler_starts_mid_epoch():
    sampler = EpochSampler(24, 1, 2, seed=0)
    sampler.set_epoch(5)
    full = list(sampler)
    sampler.set_epoch(5, start=4)
    assert list(sampler) == full[4:] and len(sampler) == len(full) - 4 == 8


def test_image_dataset_is_center_crop_then_flip_in_minus_one_to_one(image_folder):
    dataset = ImageDataset(str(image_folder), 32)
    assert len(dataset) == 24 and dataset.classes == ["class_0", "class_1", "class_2"]
    path, label = dataset.samples[9]
    expected = np.asarray(center_crop_arr(Image.open(path).convert("RGB"), 32), dtype=np.float32) / 127.5 - 1
    pixels, got_label, skipped = dataset[(9, 0)]
    assert (got_label, skipped) == (label, 0)
    torch.testing.assert_close(pixels, torch.from_numpy(expected).permute(2, 0, 1), rtol=0, atol=1e-6)
    mirrored, _, _ = dataset[(9, 1)]
    assert torch.equal(mirrored, pixels.flip(-1))


def test_unreadable_images_are_replaced_by_the_next_and_counted(tmp_path):
    root = make_image_folder(tmp_path / "images", classes=2, per_class=3)
    (root / "class_0" / "img_1.png").write_bytes(b"not an image")
    good = (root / "class_0" / "img_2.png").read_bytes()
    (root / "class_0" / "img_2.png").write_bytes(good[: len(good) // 2])  # truncated
    dataset = ImageDataset(str(root), 32)
    pixels, label, skipped = dataset[(1, 0)]
    assert skipped == 2 and label == 1
    assert torch.equal(pixels, dataset.load(3))
    assert dataset.load(1) is None and dataset.load(2) is None


def test_missing_and_empty_data_folders_get_one_sentence(tmp_path):
    with pytest.raises(ValueError, match=r"the data folder .*nope does not exist"):
        ImageDataset(str(tmp_path / "nope"), 32)
    (tmp_path / "empty" / "class_0").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"the data folder .*empty holds no images; expected class folders"):
        ImageDataset(str(tmp_path / "empty"), 32)


def test_incomplete_feature_store_is_refused(tmp_path):
    meta = {"count": 3, "latent_size": 2, "dtype": "float16", "image_size": 16, "classes": ["a"]}
    create_feature_store(str(tmp_path), meta)
    with pytest.raises(ValueError, match=r"is incomplete \(0 of 3 images\); rerun extract_features.py"):
        FeatureDataset(str(tmp_path))
    with pytest.raises(ValueError, match="is not a feature folder"):
        FeatureDataset(str(tmp_path / "nothing"))


def complete_store(path, meta: dict) -> None:
    create_feature_store(str(path), meta)
    arrays = open_feature_arrays(str(path), writable=True)
    arrays["mean"][:] = np.arange(arrays["mean"].size).reshape(arrays["mean"].shape)
    arrays["done"][:] = True
    for array in arrays.values():
        array.flush()


def test_a_store_without_an_autoencoder_entry_is_an_sd_vae_store(tmp_path):
    meta = {"count": 3, "latent_size": 2, "dtype": "float32", "vae": "stabilityai/sd-vae-ft-ema"}
    complete_store(tmp_path, meta)
    dataset = FeatureDataset(str(tmp_path))
    assert dataset.autoencoder == {
        "vae": "stabilityai/sd-vae-ft-ema", "latent_channels": 4, "downsample": 8, "scaling_factor": 0.18215, "shift_factor": 0.0,
    }
    assert dataset[(1, 0)][0].shape == (4, 2, 2)
    assert not torch.equal(dataset[(1, 0)][0], dataset[(1, 1)][0])  # the mirror is another array row


def test_a_store_takes_the_channels_of_its_autoencoder_and_may_hold_no_mirrors(tmp_path):
    autoencoder = {"vae": "folder", "latent_channels": 16, "downsample": 4, "scaling_factor": 0.5, "shift_factor": 0.1}
    meta = {"count": 3, "latent_size": 2, "dtype": "float16", "autoencoder": autoencoder, "flip": False}
    complete_store(tmp_path, meta)
    assert open_feature_arrays(str(tmp_path))["mean"].shape == (3, 1, 16, 2, 2)
    dataset = FeatureDataset(str(tmp_path))
    assert dataset.autoencoder == feature_autoencoder(meta) == autoencoder
    assert torch.equal(dataset[(2, 1)][0], dataset[(2, 0)][0])  # no mirror stored: every flip reads the image
    assert feature_bytes_per_image(2, "float16", channels=16, views=1) == 2 * 16 * 2 * 2 * 2 + 9


def test_documented_bytes_per_image():
    # docs/training.md: 256 px images (32x32 latents) take 32 KiB per image in float16, 64 KiB in float32.
    assert feature_bytes_per_image(32, "float16") == 32 * 1024 + 9
    assert feature_bytes_per_image(32, "float32") == 64 * 1024 + 9


def global_batches(size: int, world_size: int, global_batch: int, epoch: int, start_step: int = 0) -> list[list[int]]:
    """The images of each optimizer step from start_step on, gathered over the ranks' shares as
    train.py takes them (set_epoch(epoch, start_step x per-rank batch), whole global batches only)."""
    per_rank = global_batch // world_size
    steps = size // global_batch - start_step
    shares = []
    for rank in range(world_size):
        sampler = EpochSampler(size, rank, world_size, seed=3)
        sampler.set_epoch(epoch, start_step * per_rank)
        shares.append([index for index, _ in sampler])
    return [sorted(i for share in shares for i in share[k * per_rank : (k + 1) * per_rank]) for k in range(steps)]


@pytest.mark.parametrize("size", [24, 30, 31])
def test_global_batches_do_not_depend_on_the_world_size(size):
    one = global_batches(size, 1, 8, epoch=2)
    order = [index for index, _ in EpochSampler(size, 0, 1, seed=3).epoch_items(2)]
    assert one == [sorted(order[k * 8 : (k + 1) * 8]) for k in range(size // 8)]
    flat = [i for batch in one for i in batch]
    assert len(set(flat)) == len(flat) == size // 8 * 8  # no image twice, only the last partial batch left out
    for world_size in (2, 4, 8):
        assert global_batches(size, world_size, 8, epoch=2) == one
        # Resumed after step 1 on another number of processes: the remaining batches, unchanged.
        assert global_batches(size, world_size, 8, epoch=2, start_step=1) == one[1:]


def crop_of(image: Image.Image, size: int = 32) -> torch.Tensor:
    """What ImageDataset should give for an RGB image: ADM's center crop, in [-1, 1]."""
    return torch.from_numpy(np.asarray(center_crop_arr(image, size), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)


def test_grayscale_16_bit_transparent_and_non_square_images(tmp_path):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, size=(40, 50), dtype=np.uint8)
    rgba = rng.integers(0, 256, size=(48, 48, 4), dtype=np.uint8)
    rgba[:, :24, 3] = 0  # the left half fully transparent (its stored colour must not show)
    rgba[:, 24:, 3] = 255
    Image.fromarray(gray).save(tmp_path / "a_gray.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "b_gray16.png")  # 16-bit PNG
    Image.fromarray(rgba).save(tmp_path / "c_rgba.png")
    Image.fromarray(rng.integers(0, 256, size=(36, 100, 3), dtype=np.uint8)).save(tmp_path / "d_wide.jpg")
    dataset = ImageDataset(str(tmp_path), 32)  # no class folders: one class

    assert dataset.classes == [""] and [label for _, label in dataset.samples] == [0] * 4
    as_rgb = Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2))
    for index in (0, 1):  # 8- and 16-bit grayscale give the same image, repeated over RGB
        pixels, label, skipped = dataset[(index, 0)]
        assert pixels.shape == (3, 32, 32) and (label, skipped) == (0, 0)
        torch.testing.assert_close(pixels, crop_of(as_rgb), rtol=0, atol=1e-6)
    on_white = rgba[:, :, :3].copy()
    on_white[:, :24] = 255
    torch.testing.assert_close(dataset.load(2), crop_of(Image.fromarray(on_white)), rtol=0, atol=1e-6)
    wide = dataset.load(3)
    assert wide.shape == (3, 32, 32)
    torch.testing.assert_close(wide, crop_of(Image.open(tmp_path / "d_wide.jpg").convert("RGB")), rtol=0, atol=1e-6)


def test_palette_transparency_is_laid_over_white():
    image = Image.new("P", (4, 4), 0)
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)  # 0: red, 1: blue
    image.putpixel((0, 0), 1)
    image.info["transparency"] = 0  # red is transparent
    pixels = np.asarray(to_rgb(image))
    assert pixels[0, 0].tolist() == [0, 0, 255] and pixels[1, 1].tolist() == [255, 255, 255]


def test_no_flip_gives_the_unmirrored_images(tmp_path):
    root = make_image_folder(tmp_path / "images", classes=2, per_class=2)
    flipping, plain = ImageDataset(str(root), 32), ImageDataset(str(root), 32, flip=False)
    for index in range(len(plain)):
        unflipped = flipping[(index, 0)][0]
        assert torch.equal(plain[(index, 1)][0], unflipped) and torch.equal(plain[(index, 0)][0], unflipped)
        assert torch.equal(flipping[(index, 1)][0], unflipped.flip(-1)) and not torch.equal(unflipped.flip(-1), unflipped)


def break_files(folder, count: int, source) -> None:
    """`count` files broken_NNN.png in `folder`, each the first 50 bytes of `source` (a partial copy, as `head -c 50`)."""
    head = source.read_bytes()[:50]
    for i in range(count):
        (folder / f"broken_{i:03d}.png").write_bytes(head)


def test_a_run_of_105_unreadable_images_is_replaced_by_the_next_readable_one_alike_everywhere(tmp_path):
    root = make_image_folder(tmp_path / "images", classes=3, per_class=4)
    break_files(root / "class_1", 105, root / "class_1" / "img_0.png")  # sorted before class_1's images
    dataset = ImageDataset(str(root), 32)
    names = [os.path.basename(path) for path, _ in dataset.samples]
    assert names[4:109] == [f"broken_{i:03d}.png" for i in range(105)] and names[109] == "img_0.png"
    pixels, label, skipped = dataset[(4, 0)]
    assert (label, skipped) == (1, 105) and torch.equal(pixels, dataset.load(109))
    # A fresh dataset (another rank, a resumed run) makes the same replacement for every item.
    other = ImageDataset(str(root), 32)
    for index in reversed(range(len(other))):
        theirs, ours = other[(index, 1)], dataset[(index, 1)]
        assert theirs[1:] == ours[1:] and torch.equal(theirs[0], ours[0])
    assert dataset[(60, 0)][2] == 109 - 60


def test_unreadable_images_at_the_end_wrap_around_to_the_first(tmp_path):
    root = make_image_folder(tmp_path / "images", classes=1, per_class=2)
    break_files(root / "class_0", 3, root / "class_0" / "img_0.png")
    for i in range(3):  # renamed to sort last
        os.rename(root / "class_0" / f"broken_{i:03d}.png", root / "class_0" / f"x_broken_{i}.png")
    dataset = ImageDataset(str(root), 32)
    pixels, _, skipped = dataset[(2, 0)]
    assert skipped == 3 and torch.equal(pixels, dataset.load(0))


def test_a_folder_without_a_readable_image_is_one_sentence(tmp_path):
    folder = tmp_path / "images" / "class_0"
    folder.mkdir(parents=True)
    for name in ("a.png", "b.jpg"):
        (folder / name).write_bytes(b"\x89PNG partial")
    with pytest.raises(ValueError, match=r"^none of the 2 image files in the data folder .*images can be read \(the first, .*a.png: "):
        ImageDataset(str(tmp_path / "images"), 32)


def test_a_folder_link_loop_is_one_sentence(tmp_path):
    root = make_image_folder(tmp_path / "images", classes=2, per_class=2)
    os.symlink("..", root / "class_1" / "up")  # class_1/up/class_1/up/... back to the root
    listed = [path for path, label in ImageFolder(str(root)).samples if label == 1]
    assert len(listed) > 20  # torchvision follows the link until the system gives up
    with pytest.raises(ValueError, match=r"^the data folder .*images lists the folder .*class_0 again as .*class_1/up/class_0 \(a folder link loops back into the tree\); remove that link$"):
        ImageDataset(str(root), 32)


def test_the_image_fingerprint_is_the_file_list_with_sizes(tmp_path):
    root = make_image_folder(tmp_path / "images", classes=2, per_class=2)
    fingerprint = ImageDataset(str(root), 32).fingerprint()
    files = sorted(f"{path.relative_to(root)}\t{path.stat().st_size}\n" for path in root.rglob("*.png"))
    assert fingerprint == "files-sha256:" + hashlib.sha256("".join(files).encode()).hexdigest()
    shutil.copytree(root, tmp_path / "copy")
    os.symlink(root, tmp_path / "link")
    assert ImageDataset(str(tmp_path / "copy"), 32).fingerprint() == ImageDataset(str(tmp_path / "link"), 32).fingerprint() == fingerprint
    (root / "class_0" / "img_1.png").write_bytes((root / "class_0" / "img_1.png").read_bytes() + b"\0")
    assert ImageDataset(str(root), 32).fingerprint() != fingerprint
    os.rename(tmp_path / "copy" / "class_0" / "img_1.png", tmp_path / "copy" / "class_0" / "img_9.png")
    assert ImageDataset(str(tmp_path / "copy"), 32).fingerprint() != fingerprint


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda path: os.truncate(path / "mean.npy", 500), r"mean.npy is 500 bytes long, not 896 \(cut short\)"),
        (lambda path: open(path / "std.npy", "ab").write(b"\0" * 8), r"std.npy is 904 bytes long, not 896 \(too long\)"),
        (lambda path: os.remove(path / "labels.npy"), r"labels.npy is missing"),
        (lambda path: np.save(path / "done.npy", np.zeros(4, bool)), r"done.npy holds a bool array of shape \(4,\), not bool \(3,\)"),
        (lambda path: (path / "mean.npy").write_bytes(b"garbage"), r"mean.npy has no valid .npy header \(EOF: .*\)"),
    ],
)
def test_a_damaged_store_is_refused_naming_the_file_before_any_array_is_mapped(tmp_path, damage, message):
    meta = {"count": 3, "latent_size": 4, "dtype": "float16", "image_size": 32, "classes": ["a"]}
    complete_store(tmp_path, meta)
    # mean and std: a 128-byte header, then 3 images x 2 views x 4 channels x 4 x 4 float16 values.
    assert os.path.getsize(tmp_path / "mean.npy") == 128 + 3 * 2 * 4 * 4 * 4 * 2 == 896
    damage(tmp_path)
    sizes = {name: os.path.getsize(tmp_path / name) for name in os.listdir(tmp_path)}
    with pytest.raises(FeatureStoreError, match=rf"^the feature folder .* is damaged: {message}; rerun extract_features.py with the same arguments"):
        FeatureDataset(str(tmp_path))
    with pytest.raises(FeatureStoreError, match=message):
        open_feature_arrays(str(tmp_path), writable=True)
    assert {name: os.path.getsize(tmp_path / name) for name in os.listdir(tmp_path)} == sizes  # nothing extended
