"""extract_features.py and training from its output: the store holds the VAE posterior of each
image and of its mirror, and training from it draws latents from the same distribution as
encoding the images on the fly. On a full or read-only disk: one sentence with the path and
the bytes needed, before any image is encoded (a memory map on a full disk dies with SIGBUS)."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import extract_features
import train
from conftest import (
    TINY, extract_args, make_image_folder, make_other_vae, make_read_only, make_unreadable_image_folder, read_metrics,
    run_script, tmpfs
)
from util.data import (
    FeatureDataset, ImageDataset, create_feature_store, feature_bytes_per_image, open_feature_arrays
)
from util.training import latents_from_features, latents_from_images
from util.vae import Autoencoder, LATENT_SCALE, load_vae


@pytest.fixture(scope="module")
def store(tmp_path_factory, image_folder, tiny_vae_dir) -> Path:
    """The float16 store of the 24 test images, encoded in one batch."""
    out = tmp_path_factory.mktemp("features") / "f16"
    run_script(["extract_features.py", *extract_args(image_folder, tiny_vae_dir, out, "--batch-size", "24")])
    return out


@pytest.fixture(scope="module")
def on_the_fly(image_folder, tiny_vae_dir):
    """The VAE posterior of the 24 images and their mirrors, encoded as one batch like the store."""
    images = ImageDataset(str(image_folder), 64)
    pixels = torch.stack([images[(i, 0)][0] for i in range(len(images))])
    mirrored = torch.stack([images[(i, 1)][0] for i in range(len(images))])
    vae = load_vae("ema", torch.device("cpu"), str(tiny_vae_dir))
    with torch.no_grad():
        posterior = vae.encode(torch.cat([pixels, mirrored])).latent_dist
    return vae, torch.cat([pixels, mirrored]), posterior


def as_pairs(x: torch.Tensor) -> torch.Tensor:
    """(2N, ...) [images; mirrors] -> (N, 2, ...) as stored."""
    return torch.stack(x.chunk(2), dim=1)


@pytest.mark.slow
def test_store_layout(store, image_folder):
    meta = json.loads((store / "meta.json").read_text())
    assert (meta["image_size"], meta["latent_size"], meta["count"], meta["dtype"]) == (64, 8, 24, "float16")
    assert meta["classes"] == ["class_0", "class_1", "class_2"]
    arrays = open_feature_arrays(str(store))
    assert arrays["mean"].shape == arrays["std"].shape == (24, 2, 4, 8, 8)
    assert arrays["mean"].dtype == np.float16 and arrays["done"].all()
    assert arrays["labels"].tolist() == [label for _, label in ImageDataset(str(image_folder), 64).samples]
    data_bytes = sum(os.path.getsize(store / f"{name}.npy") - 128 for name in ("mean", "std", "labels", "done"))
    assert data_bytes == 24 * feature_bytes_per_image(8, "float16")  # each .npy has a 128-byte header


@pytest.mark.slow
def test_stored_mean_and_std_are_the_vae_posterior_of_image_and_mirror(store, on_the_fly):
    _, _, posterior = on_the_fly
    arrays = open_feature_arrays(str(store))
    assert torch.equal(torch.from_numpy(np.array(arrays["mean"])), as_pairs(posterior.mean).half())
    assert torch.equal(torch.from_numpy(np.array(arrays["std"])), as_pairs(posterior.std).half())


@pytest.mark.slow
def test_same_eps_gives_the_same_latents_float16(store, on_the_fly):
    _, _, posterior = on_the_fly
    dataset = FeatureDataset(str(store))
    items = [dataset[(i, flip)] for flip in (0, 1) for i in range(24)]  # same order as the posterior batch
    mean, std = torch.stack([item[0] for item in items]), torch.stack([item[1] for item in items])
    torch.manual_seed(3)
    ours = latents_from_features(mean, std)
    torch.manual_seed(3)
    eps = torch.randn(posterior.mean.shape)
    expected = (posterior.mean.half().float() + posterior.std.half().float() * eps) * LATENT_SCALE
    assert torch.equal(ours, expected)


def test_same_eps_gives_the_same_latents_float32(store32, on_the_fly):
    # Stored in float32, the feature path reproduces the VAE's own posterior sample bit for bit.
    vae, pixels, _ = on_the_fly
    arrays = open_feature_arrays(str(store32))
    mean = torch.from_numpy(np.concatenate([arrays["mean"][:, 0], arrays["mean"][:, 1]]))
    std = torch.from_numpy(np.concatenate([arrays["std"][:, 0], arrays["std"][:, 1]]))
    torch.manual_seed(5)
    ours = latents_from_features(mean, std)
    torch.manual_seed(5)
    assert torch.equal(ours, latents_from_images(Autoencoder.from_module("ema", vae), pixels))


@pytest.mark.slow
def test_training_from_features_matches_training_from_images(tmp_path, store32, image_folder, tiny_vae_dir):
    common = ["--vae-path", str(tiny_vae_dir), *TINY, "--max-steps", "2", "--log-every", "1"]
    train.main([*common, "--data-path", str(image_folder), "--results-dir", str(tmp_path / "images")])
    train.main([*common, "--feature-path", str(store32), "--results-dir", str(tmp_path / "features")])
    from_images = [m["loss"] for m in read_metrics(tmp_path / "images" / "000-DiT-S-8")]
    from_features = [m["loss"] for m in read_metrics(tmp_path / "features" / "000-DiT-S-8")]
    # Same data order, flips and random draws; only the VAE's batch composition differs (float noise).
    assert from_features == pytest.approx(from_images, rel=1e-5)


@pytest.mark.slow
def test_interrupted_extraction_continues_under_torchrun(tmp_path, store, image_folder, tiny_vae_dir):
    partial = tmp_path / "partial"
    shutil.copytree(store, partial)
    arrays = open_feature_arrays(str(partial), writable=True)
    lost = [1, 2, 5, 11, 17, 23]  # as if killed before these rows were written
    for name in ("mean", "std", "labels", "done"):
        arrays[name][lost] = 0
        arrays[name].flush()
    run_script(["extract_features.py", *extract_args(image_folder, tiny_vae_dir, partial, "--batch-size", "2")], nproc=2)

    finished, reference = open_feature_arrays(str(partial)), open_feature_arrays(str(store))
    assert finished["done"].all() and np.array_equal(finished["labels"], reference["labels"])
    kept = [i for i in range(24) if i not in lost]
    for name in ("mean", "std"):
        assert np.array_equal(finished[name][kept], reference[name][kept])  # untouched rows stay as they were
        # Re-encoded rows: equal up to float noise from another batch composition, seen through float16.
        np.testing.assert_allclose(finished[name][lost].astype(np.float32), reference[name][lost].astype(np.float32), rtol=2e-3, atol=1e-4)


@pytest.mark.slow
def test_extraction_into_a_store_of_other_settings_is_refused(store, image_folder, tiny_vae_dir):
    args = extract_args(image_folder, tiny_vae_dir, store)
    args[args.index("--image-size") + 1] = "128"
    with pytest.raises(SystemExit, match=r"holds features made with other settings: image_size 64 \(now 128\); pass another --feature-path"):
        extract_features.main(args)


@pytest.mark.slow
def test_training_refuses_features_of_another_image_size_or_vae(tmp_path, store, tiny_vae_dir):
    args = ["--feature-path", str(store), "--vae-path", str(tiny_vae_dir), "--results-dir", str(tmp_path), *TINY]
    wrong_size = [*args[: args.index("--image-size") + 1], "128", *args[args.index("--image-size") + 2 :]]
    with pytest.raises(SystemExit, match=r"were extracted at --image-size 64, not 128"):
        train.main(wrong_size)

    other_vae = load_vae("ema", torch.device("cpu"), str(tiny_vae_dir))
    with torch.no_grad():
        other_vae.encoder.conv_in.bias.add_(1.0)
    other_vae.save_pretrained(tmp_path / "other_vae")
    args[args.index("--vae-path") + 1] = str(tmp_path / "other_vae")
    with pytest.raises(SystemExit, match=r"were extracted with another VAE \(.*\) than .*other_vae"):
        train.main(args)
    assert not (tmp_path / "000-DiT-S-8").exists()


def test_unreadable_images_are_marked_and_skipped(tmp_path, tiny_vae_dir):
    data = make_image_folder(tmp_path / "images", classes=2, per_class=2)
    (data / "class_0" / "img_1.png").write_bytes(b"broken")
    extract_features.main(extract_args(data, tiny_vae_dir, tmp_path / "features", "--batch-size", "4"))
    dataset = FeatureDataset(str(tmp_path / "features"))
    assert dataset.labels.tolist() == [0, -1, 1, 1]
    mean, std, label, skipped = dataset[(1, 1)]
    assert (label, skipped) == (1, 1)
    assert torch.equal(mean, dataset[(2, 1)][0]) and torch.equal(std, dataset[(2, 1)][1])


@pytest.fixture(scope="module")
def other_vae_store(tmp_path_factory, image_folder) -> tuple[Path, Path]:
    """The 24 test images at 32 px through an 8-channel, 4x AutoencoderKL with scale 0.5 and shift 0.1."""
    root = tmp_path_factory.mktemp("other")
    vae_dir = make_other_vae(root / "vae")
    args = extract_args(image_folder, vae_dir, root / "features", "--batch-size", "24", "--dtype", "float32")
    extract_features.main([*args[:args.index("--image-size") + 1], "32", *args[args.index("--image-size") + 2:]])
    return root / "features", vae_dir


@pytest.mark.slow
def test_a_store_takes_the_autoencoders_channels_and_size(other_vae_store, image_folder):
    store, vae_dir = other_vae_store
    meta = json.loads((store / "meta.json").read_text())
    assert meta["latent_size"] == 8 and meta["flip"] is True
    assert meta["autoencoder"] == {
        "vae": str(vae_dir), "latent_channels": 8, "downsample": 4, "scaling_factor": 0.5, "shift_factor": 0.1,
    }
    arrays = open_feature_arrays(str(store))
    assert arrays["mean"].shape == arrays["std"].shape == (24, 2, 8, 8, 8)
    images = ImageDataset(str(image_folder), 32)
    pixels = torch.stack([images[(i, flip)][0] for flip in (0, 1) for i in range(24)])
    module = load_vae("ema", torch.device("cpu"), str(vae_dir))
    with torch.no_grad():
        posterior = module.encode(pixels).latent_dist
    torch.testing.assert_close(torch.from_numpy(np.array(arrays["mean"])), as_pairs(posterior.mean), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_a_stores_moments_become_latents_with_its_scale_and_shift(other_vae_store):
    store, _ = other_vae_store
    dataset = FeatureDataset(str(store))
    assert (dataset.autoencoder["scaling_factor"], dataset.autoencoder["shift_factor"]) == (0.5, 0.1)
    mean, std, _, _ = dataset[(3, 1)]
    torch.manual_seed(4)
    latents = Autoencoder.from_description(dataset.autoencoder).from_moments(mean, std)
    torch.manual_seed(4)
    assert torch.equal(latents, (mean + std * torch.randn(8, 8, 8) - 0.1) * 0.5)


def test_no_flip_stores_the_images_only(tmp_path, image_folder, tiny_vae_dir, on_the_fly):
    extract_features.main(extract_args(image_folder, tiny_vae_dir, tmp_path / "plain", "--batch-size", "24", "--no-flip"))
    meta = json.loads((tmp_path / "plain" / "meta.json").read_text())
    assert meta["flip"] is False
    arrays = open_feature_arrays(str(tmp_path / "plain"))
    assert arrays["mean"].shape == (24, 1, 4, 8, 8)
    assert os.path.getsize(tmp_path / "plain" / "mean.npy") - 128 == 24 * 4 * 8 * 8 * 2
    vae, pixels, _ = on_the_fly
    with torch.no_grad():
        posterior = vae.encode(pixels[:24]).latent_dist  # the unflipped images, one batch as extracted
    assert torch.equal(torch.from_numpy(np.array(arrays["mean"][:, 0])), posterior.mean.half())
    dataset = FeatureDataset(str(tmp_path / "plain"))
    for flip in (0, 1):  # the sampler's flip finds no mirror to take
        assert torch.equal(dataset[(5, flip)][0], torch.from_numpy(np.array(arrays["mean"][5, 0])))
    with pytest.raises(SystemExit, match=r"other settings: flip False \(now True\)"):
        extract_features.main(extract_args(image_folder, tiny_vae_dir, tmp_path / "plain"))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--vae", "none"], r"^--vae none trains on pixels, which need no features: train from the image folder \(train\.py --data-path\)$"),
        (["--image-size", "30"], r"^--image-size 30 is not a positive multiple of 4 \(the VAE downsamples by 4\)$"),
        (["--vae-path", "MISSING"], r"^--vae-path \S+missing is not a diffusers AutoencoderKL folder \(no config.json in it\)$"),
    ],
)
def test_unusable_autoencoder_settings_are_one_sentence(tmp_path, image_folder, monkeypatch, extra, message):
    vae_dir = make_other_vae(tmp_path / "vae")
    args = extract_args(image_folder, vae_dir, tmp_path / "features")
    if extra[0] == "--vae":
        args = args[: args.index("--vae-path")] + args[args.index("--vae-path") + 2 :]
    monkeypatch.setattr(extract_features, "setup_distributed", lambda: pytest.fail("set up before the refusal"))
    value = str(tmp_path / "missing") if extra[1] == "MISSING" else extra[1]
    with pytest.raises(SystemExit, match=message):
        extract_features.main([*args, extra[0], value])
    assert not (tmp_path / "features").exists()


NEEDED_F16 = 24 * feature_bytes_per_image(8, "float16")  # the 24 test images at 64 px


NEEDED_F32 = 24 * feature_bytes_per_image(8, "float32")


def one_batch_args(data: Path, vae: Path, out: Path, *extra: str) -> list[str]:
    return ["--data-path", str(data), "--feature-path", str(out), "--image-size", "64", "--vae-path", str(vae),
            "--num-workers", "0", "--batch-size", "24", *extra]


def no_vae(*args, **kwargs):
    raise AssertionError("the VAE was loaded before the disk space was checked")


def test_too_little_free_space_is_one_sentence_before_any_work(tmp_path, monkeypatch, image_folder, tiny_vae_dir):
    free = NEEDED_F16 - 1
    monkeypatch.setattr(extract_features.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - free, free))
    monkeypatch.setattr(extract_features, "load_autoencoder", no_vae)
    out = tmp_path / "features"
    with pytest.raises(SystemExit, match=rf"^not enough disk space for the features in {out}: they need {NEEDED_F16:,} bytes \(0.00 GiB\) and {free:,} are free; free some space or pass another --feature-path$"):
        extract_features.main(one_batch_args(image_folder, tiny_vae_dir, out))
    assert not out.exists()


def test_a_failed_reservation_is_one_sentence_and_a_rerun_finishes(tmp_path, monkeypatch, image_folder, tiny_vae_dir):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    out = tmp_path / "features"
    monkeypatch.setattr(extract_features.os, "posix_fallocate", full)
    with pytest.raises(SystemExit, match=rf"^not enough disk space for the features in {out}: they need [\d,]+ bytes .*; free some space or pass another --feature-path$"):
        extract_features.main(one_batch_args(image_folder, tiny_vae_dir, out))
    assert not open_feature_arrays(str(out))["done"].any()  # nothing was encoded
    monkeypatch.undo()  # space freed: the same command continues the store
    extract_features.main(one_batch_args(image_folder, tiny_vae_dir, out))
    assert open_feature_arrays(str(out))["done"].all()


def test_a_really_full_disk_fails_before_any_work(tmp_path, image_folder, tiny_vae_dir, monkeypatch):
    with tmpfs(tmp_path / "fs", "64k") as fs:
        monkeypatch.setattr(extract_features, "load_autoencoder", no_vae)
        with pytest.raises(SystemExit, match=rf"not enough disk space for the features in {fs}/f32: they need {NEEDED_F32:,} bytes"):
            extract_features.main(one_batch_args(image_folder, tiny_vae_dir, fs / "f32", "--dtype", "float32"))
        assert os.listdir(fs) == []


def test_reservation_catches_a_disk_that_fills_after_the_check(tmp_path, image_folder, tiny_vae_dir, monkeypatch):
    # The free-space check passes (as if another job filled the disk right after it); the real
    # fallocate on the 64 KB tmpfs then fails, where a memory map would have died with SIGBUS.
    with tmpfs(tmp_path / "fs", "64k") as fs:
        monkeypatch.setattr(extract_features, "check_free_space", lambda path, needed: None)
        with pytest.raises(SystemExit, match=rf"^not enough disk space for the features in {fs}/f32: they need [\d,]+ bytes"):
            extract_features.main(one_batch_args(image_folder, tiny_vae_dir, fs / "f32", "--dtype", "float32"))


def test_sparse_stores_get_their_blocks_reserved(tmp_path):
    meta = {"count": 64, "latent_size": 32, "dtype": "float32"}
    create_feature_store(str(tmp_path), meta)  # numpy makes sparse files
    assert extract_features.bytes_to_allocate(str(tmp_path), 64, 32, "float32") > 64 * 2 * 4 * 32 * 32 * 4
    assert extract_features.preallocate(str(tmp_path)) is None
    assert extract_features.bytes_to_allocate(str(tmp_path), 64, 32, "float32") == 0
    assert not np.array(open_feature_arrays(str(tmp_path))["mean"]).any()  # still zeros


def test_a_read_only_feature_folder_is_one_sentence(tmp_path, image_folder, tiny_vae_dir, monkeypatch):
    with tmpfs(tmp_path / "fs", "1m") as fs:
        make_read_only(fs)
        with pytest.raises(SystemExit, match=rf"^--feature-path {fs}/features is not writable \({fs} is read-only or lacks write permission\)$"):
            extract_features.main(one_batch_args(image_folder, tiny_vae_dir, fs / "features"))
        # Should the folder turn read-only after the check, creating the store fails with one sentence too.
        monkeypatch.setattr(extract_features, "validate_args", lambda args: None)
        with pytest.raises(SystemExit, match=rf"^cannot create the feature folder {fs}/features: the folder is read-only or not writable \(.+\)$"):
            extract_features.main(one_batch_args(image_folder, tiny_vae_dir, fs / "features"))


@pytest.mark.parametrize(
    "flag,value,message",
    [
        ("--batch-size", "0", r"--batch-size must be at least 1, not 0"),
        ("--num-workers", "-1", r"--num-workers must be 0 or more, not -1"),
        ("--feature-path", "FILE", r"--feature-path .*a_file is a file, not a folder"),
    ],
)
def test_bad_flags_are_one_sentence(tmp_path, image_folder, tiny_vae_dir, monkeypatch, flag, value, message):
    (tmp_path / "a_file").write_text("")
    args = one_batch_args(image_folder, tiny_vae_dir, tmp_path / "features")
    args[args.index(flag) + 1] = str(tmp_path / "a_file") if value == "FILE" else value
    monkeypatch.setattr(extract_features, "setup_distributed", no_vae)  # refused before any set-up
    with pytest.raises(SystemExit, match=rf"^{message}$"):
        extract_features.main(args)


def test_a_complete_store_records_the_checksum_of_its_arrays(store32):
    digest = hashlib.sha256()
    for name in ("mean", "std", "labels", "done"):
        digest.update((store32 / f"{name}.npy").read_bytes())
    meta = json.loads((store32 / "meta.json").read_text())
    assert meta["checksum"] == f"sha256:{digest.hexdigest()}" == FeatureDataset(str(store32)).fingerprint()


@pytest.mark.slow
def test_a_cut_short_store_is_refused_by_training_and_redone_by_extraction(tmp_path, tiny_vae_dir, capsys):
    data = make_image_folder(tmp_path / "images", classes=3, per_class=80)  # 240 images
    features = tmp_path / "features"
    args = extract_args(data, tiny_vae_dir, features, "--batch-size", "48")
    extract_features.main(args)
    shutil.copytree(features, tmp_path / "original")
    os.truncate(features / "mean.npy", 100_000)  # as `truncate -s 100000 mean.npy`: 142 of the 240 means cut off
    train_args = ["--feature-path", str(features), "--vae-path", str(tiny_vae_dir), "--results-dir", str(tmp_path / "results"),
                  *TINY, "--max-steps", "1"]
    with pytest.raises(SystemExit, match=r"^the feature folder .*features is damaged: mean.npy is 100,000 bytes long, not 245,888 \(cut short\); rerun extract_features.py with the same arguments to redo the damaged arrays$"):
        train.main(train_args)
    assert os.path.getsize(features / "mean.npy") == 100_000 and not (tmp_path / "results").exists()

    capsys.readouterr()
    extract_features.main(args)
    log = capsys.readouterr().err
    assert "mean.npy is 100,000 bytes long, not 245,888 (cut short)): recreated mean.npy and cleared the done flags, so all 240 images are encoded again" in log
    assert "240 images in" in log and "240 to encode" in log
    redone, original = open_feature_arrays(str(features)), open_feature_arrays(str(tmp_path / "original"))
    for name in ("mean", "std", "labels", "done"):  # the same batches as the first extraction: the same numbers
        assert np.array_equal(redone[name], original[name]), name
    assert json.loads((features / "meta.json").read_text())["checksum"] == json.loads((tmp_path / "original" / "meta.json").read_text())["checksum"]
    train.main(train_args)
    assert (tmp_path / "results" / "000-DiT-S-8" / "checkpoints" / "0000001.pt").exists()


def test_a_folder_without_a_readable_image_is_one_sentence_before_the_store_is_made(tmp_path, tiny_vae_dir):
    images = make_unreadable_image_folder(tmp_path / "images")
    with pytest.raises(SystemExit, match=r"^none of the 1 image files in the data folder .*images can be read"):
        extract_features.main(extract_args(images, tiny_vae_dir, tmp_path / "features"))
    assert not (tmp_path / "features").exists()


def test_finishing_a_store_writes_the_checksum_of_its_final_arrays(tmp_path, store32, image_folder, tiny_vae_dir):
    partial = tmp_path / "partial"
    shutil.copytree(store32, partial)
    arrays = open_feature_arrays(str(partial), writable=True)
    arrays["mean"][3] = 7.0  # a row written by a killed run and not yet marked done
    arrays["done"][3] = False
    for array in arrays.values():
        array.flush()
    extract_features.main(extract_args(image_folder, tiny_vae_dir, partial, "--batch-size", "24", "--dtype", "float32"))
    digest = hashlib.sha256(b"".join((partial / f"{name}.npy").read_bytes() for name in ("mean", "std", "labels", "done")))
    assert json.loads((partial / "meta.json").read_text())["checksum"] == f"sha256:{digest.hexdigest()}"
    assert not np.array_equal(open_feature_arrays(str(partial))["mean"][3], np.full_like(arrays["mean"][3], 7.0))
