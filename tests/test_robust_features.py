"""extract_features.py on a full or read-only disk: one sentence with the path and the bytes
needed, before any image is encoded (a memory map on a full disk dies with SIGBUS instead)."""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import extract_features
from util.data import create_feature_store, feature_bytes_per_image, open_feature_arrays
from conftest import make_read_only, tmpfs

NEEDED_F16 = 24 * feature_bytes_per_image(8, "float16")  # the 24 test images at 64 px
NEEDED_F32 = 24 * feature_bytes_per_image(8, "float32")


def extract_args(data: Path, vae: Path, out: Path, *extra: str) -> list[str]:
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
        extract_features.main(extract_args(image_folder, tiny_vae_dir, out))
    assert not out.exists()


def test_a_failed_reservation_is_one_sentence_and_a_rerun_finishes(tmp_path, monkeypatch, image_folder, tiny_vae_dir):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    out = tmp_path / "features"
    monkeypatch.setattr(extract_features.os, "posix_fallocate", full)
    with pytest.raises(SystemExit, match=rf"^not enough disk space for the features in {out}: they need [\d,]+ bytes .*; free some space or pass another --feature-path$"):
        extract_features.main(extract_args(image_folder, tiny_vae_dir, out))
    assert not open_feature_arrays(str(out))["done"].any()  # nothing was encoded
    monkeypatch.undo()  # space freed: the same command continues the store
    extract_features.main(extract_args(image_folder, tiny_vae_dir, out))
    assert open_feature_arrays(str(out))["done"].all()


def test_a_really_full_disk_fails_before_any_work(tmp_path, image_folder, tiny_vae_dir, monkeypatch):
    with tmpfs(tmp_path / "fs", "64k") as fs:
        monkeypatch.setattr(extract_features, "load_autoencoder", no_vae)
        with pytest.raises(SystemExit, match=rf"not enough disk space for the features in {fs}/f32: they need {NEEDED_F32:,} bytes"):
            extract_features.main(extract_args(image_folder, tiny_vae_dir, fs / "f32", "--dtype", "float32"))
        assert os.listdir(fs) == []


def test_reservation_catches_a_disk_that_fills_after_the_check(tmp_path, image_folder, tiny_vae_dir, monkeypatch):
    # The free-space check passes (as if another job filled the disk right after it); the real
    # fallocate on the 64 KB tmpfs then fails, where a memory map would have died with SIGBUS.
    with tmpfs(tmp_path / "fs", "64k") as fs:
        monkeypatch.setattr(extract_features, "check_free_space", lambda path, needed: None)
        with pytest.raises(SystemExit, match=rf"^not enough disk space for the features in {fs}/f32: they need [\d,]+ bytes"):
            extract_features.main(extract_args(image_folder, tiny_vae_dir, fs / "f32", "--dtype", "float32"))


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
            extract_features.main(extract_args(image_folder, tiny_vae_dir, fs / "features"))
        # Should the folder turn read-only after the check, creating the store fails with one sentence too.
        monkeypatch.setattr(extract_features, "validate_args", lambda args: None)
        with pytest.raises(SystemExit, match=rf"^cannot create the feature folder {fs}/features: the folder is read-only or not writable \(.+\)$"):
            extract_features.main(extract_args(image_folder, tiny_vae_dir, fs / "features"))


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
    args = extract_args(image_folder, tiny_vae_dir, tmp_path / "features")
    args[args.index(flag) + 1] = str(tmp_path / "a_file") if value == "FILE" else value
    monkeypatch.setattr(extract_features, "setup_distributed", no_vae)  # refused before any set-up
    with pytest.raises(SystemExit, match=rf"^{message}$"):
        extract_features.main(args)
