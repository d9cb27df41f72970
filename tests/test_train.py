"""train.py end to end on a CPU: one process and two gloo processes, exact resume, stop signals,
full and read-only disks, bad flags and input, training from features, gradient accumulation,
unconditional training on any image folder, TensorBoard events.

Every run trains DiT-S/8 on 64 px images (8x8 latents: one token) of 3 classes with the
tiny VAE; 24 images with a global batch of 8 make 3 steps per epoch.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train
from conftest import (
    REPO, TINY, assert_state_dicts_equal, make_image_folder, make_read_only, make_unreadable_image_folder, read_metrics,
    run_script, start_torchrun, tmpfs, train_args, wait_for_step, worker_pid
)
from diffusion import create_diffusion
from models import DiT_models
from util.sample_grids import SAMPLE_COUNT, sample_images
from util.training import build_optimizer, training_step


@pytest.fixture(scope="module")
def five_steps(tmp_path_factory, image_folder, tiny_vae_dir) -> Path:
    """An uninterrupted run of 5 steps (through an epoch boundary) with a sample grid at step 5."""
    results = tmp_path_factory.mktemp("results")
    run_script(["train.py", *train_args(image_folder, tiny_vae_dir, results, "--max-steps", "5", "--log-every", "1",
                                        "--sample-every", "5", "--sample-steps", "2")])
    return results / "000-DiT-S-8"


@pytest.mark.slow
def test_one_process_run_writes_the_experiment_folder(five_steps):
    assert sorted(os.listdir(five_steps)) == ["checkpoints", "log.txt", "metrics.jsonl", "samples"]
    assert os.listdir(five_steps / "checkpoints") == ["0000005.pt"]  # the end of the run is always saved
    log = (five_steps / "log.txt").read_text()
    assert "(step=0000005) train loss:" in log and "done after 5 steps" in log

    metrics = read_metrics(five_steps)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5]
    for m in metrics:
        assert set(m) == {"step", "loss", "steps_per_sec", "images_per_sec", "lr", "grad_norm", "peak_memory_mb", "skipped_images"}
        assert 0.5 < m["loss"] < 2 and m["grad_norm"] > 0 and m["peak_memory_mb"] > 100 and m["lr"] == 1e-4
        assert m["images_per_sec"] == pytest.approx(8 * m["steps_per_sec"]) and m["skipped_images"] == 0

    grid = Image.open(five_steps / "samples" / "0000005.png")
    assert grid.size == (4 * 64 + 5 * 2, 2 * 64 + 3 * 2)  # 8 images, 4 per row, 2 px padding


@pytest.mark.slow
def test_checkpoint_format_and_loaders(five_steps):
    from util.pretrained import find_model

    path = five_steps / "checkpoints" / "0000005.pt"
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert {"model", "ema", "opt", "args"} <= ckpt.keys()
    assert (ckpt["step"], ckpt["epoch"], ckpt["epoch_step"], ckpt["world_size"], ckpt["dataset_size"]) == (5, 1, 2, 1, 24)
    assert ckpt["args"]["model"] == "DiT-S/8" and isinstance(ckpt["args"], dict)
    assert len(ckpt["rng"]) == 1 and ckpt["rng"][0]["cpu"].dtype == torch.uint8

    model = DiT_models["DiT-S/8"](input_size=8, num_classes=3)
    model.load_state_dict(ckpt["model"], strict=True)
    model.load_state_dict(ckpt["ema"], strict=True)
    # EMA with decay 0.9999 trails the model: close to it after 5 steps, but not equal.
    diff = ckpt["model"]["final_layer.linear.weight"] - ckpt["ema"]["final_layer.linear.weight"]
    assert 0 < diff.abs().max() < 1e-2
    assert_state_dicts_equal(find_model(str(path)), ckpt["ema"])
    # The reference's sampler loads with a storage-keeping map_location and takes `ema`.
    assert_state_dicts_equal(torch.load(path, map_location=lambda storage, loc: storage)["ema"], ckpt["ema"])


@pytest.mark.slow
def test_resume_is_bitwise_equal_to_an_uninterrupted_run(tmp_path, five_steps, image_folder, tiny_vae_dir):
    # Stop at step 3, the end of epoch 0, then continue with --resume auto (and a data worker).
    args = train_args(image_folder, tiny_vae_dir, tmp_path, "--log-every", "1", "--resume", "auto")
    run_script(["train.py", *args, "--max-steps", "3"])
    experiment = tmp_path / "000-DiT-S-8"
    assert "--resume auto found no checkpoint of DiT-S/8 in" in (experiment / "log.txt").read_text()
    resumed = run_script(["train.py", *args, "--max-steps", "5", "--num-workers", "1"])
    assert os.listdir(tmp_path) == ["000-DiT-S-8"]  # continued in the same folder
    assert "resuming from" in resumed.stdout + resumed.stderr
    assert sorted(os.listdir(experiment / "checkpoints")) == ["0000003.pt", "0000005.pt"]

    ours = torch.load(experiment / "checkpoints" / "0000005.pt", weights_only=True)
    reference = torch.load(five_steps / "checkpoints" / "0000005.pt", weights_only=True)
    assert_state_dicts_equal(ours["model"], reference["model"])
    assert_state_dicts_equal(ours["ema"], reference["ema"])
    for a, b in zip(ours["opt"]["state"].values(), reference["opt"]["state"].values()):
        assert_state_dicts_equal(a, b)
    assert torch.equal(ours["rng"][0]["cpu"], reference["rng"][0]["cpu"])
    assert [m["loss"] for m in read_metrics(experiment)] == [m["loss"] for m in read_metrics(five_steps)]


@pytest.mark.slow
def test_two_gloo_processes_with_bf16_and_grad_checkpointing(tmp_path, image_folder, tiny_vae_dir):
    args = train_args(image_folder, tiny_vae_dir, tmp_path, "--max-steps", "2", "--log-every", "1",
                      "--precision", "bf16", "--grad-checkpointing")
    run_script(["train.py", *args], nproc=2)
    experiment = tmp_path / "000-DiT-S-8"
    metrics = read_metrics(experiment)
    assert [m["step"] for m in metrics] == [1, 2] and all(0.5 < m["loss"] < 2 for m in metrics)
    ckpt = torch.load(experiment / "checkpoints" / "0000002.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    assert not torch.equal(ckpt["rng"][0]["cpu"], ckpt["rng"][1]["cpu"])  # per-rank seeds
    DiT_models["DiT-S/8"](input_size=8, num_classes=3).load_state_dict(ckpt["ema"], strict=True)
    # (Resuming such a checkpoint on one process: test_resume.py.)


def first_losses(precision: str = "fp32", grad_checkpointing: bool = False, steps: int = 3) -> list[float]:
    torch.manual_seed(0)
    model = DiT_models["DiT-S/8"](input_size=8, num_classes=3)
    model.set_grad_checkpointing(grad_checkpointing)
    optimizer = build_optimizer(model, 1e-4)
    diffusion = create_diffusion("")
    losses = []
    for _ in range(steps):
        loss, norm, _ = training_step(model, diffusion, optimizer, torch.randn(8, 4, 8, 8), torch.arange(8) % 3, precision, True)
        assert loss.dtype == torch.float32 and torch.isfinite(loss) and torch.isfinite(norm)
        losses.append(loss.item())
    return losses


@pytest.mark.slow
def test_bf16_and_grad_checkpointing_match_fp32():
    fp32 = first_losses()
    assert first_losses(grad_checkpointing=True) == pytest.approx(fp32, rel=1e-5)
    assert first_losses("bf16") == pytest.approx(fp32, rel=2e-2)


@pytest.mark.slow
def test_sample_grids_use_fixed_noise_and_leave_the_training_rng_alone(tiny_vae_dir):
    from util.vae import load_autoencoder

    torch.manual_seed(0)
    ema = DiT_models["DiT-S/8"](input_size=8, num_classes=3).eval()
    for p in ema.parameters():
        p.data.add_(0.01 * torch.randn_like(p))  # make the output depend on the weights
    vae = load_autoencoder("ema", torch.device("cpu"), str(tiny_vae_dir))
    state = torch.get_rng_state()
    first = sample_images(ema, vae, 3, num_classes=3, seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    assert first.shape == (SAMPLE_COUNT, 3, 64, 64) and torch.isfinite(first).all()
    assert torch.equal(sample_images(ema, vae, 3, num_classes=3, seed=0), first)
    assert not torch.equal(sample_images(ema, vae, 3, num_classes=3, seed=1), first)


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, image_folder, tiny_vae_dir):
    # lr 1e30: step 1 starts from sane weights (finite loss), then the weights are ~1e30.
    args = train_args(image_folder, tiny_vae_dir, tmp_path, "--max-steps", "6", "--log-every", "1", "--ckpt-every", "1", "--lr", "1e30")
    with pytest.raises(SystemExit, match=r"became non-finite at step 2; stopping without saving these weights \(last good checkpoint: .*0000001.pt\)"):
        train.main(args)
    experiment = tmp_path / "000-DiT-S-8"
    assert os.listdir(experiment / "checkpoints") == ["0000001.pt"]
    assert "non-finite at step 2" in (experiment / "log.txt").read_text()


@pytest.mark.slow
def test_keep_last_deletes_older_checkpoints_only_after_the_new_one_is_written(tmp_path, image_folder, tiny_vae_dir, monkeypatch):
    import errno

    from util import run_outputs
    from util.files import WriteError

    args = train_args(image_folder, tiny_vae_dir, tmp_path, "--log-every", "1", "--ckpt-every", "1", "--keep-last", "2", "--resume", "auto")
    train.main([*args, "--max-steps", "3"])
    folder = tmp_path / "000-DiT-S-8" / "checkpoints"
    assert sorted(os.listdir(folder)) == ["0000002.pt", "0000003.pt"]
    assert f"removed 1 older checkpoint(s), keeping the newest 2: {folder / '0000001.pt'}" in (folder.parent / "log.txt").read_text()
    (folder / "0000009.pt").write_bytes(b"a later step: another branch of the run, damaged")
    train.main([*args, "--max-steps", "5"])  # skips 0000009.pt, resumes from 0000003.pt
    assert sorted(os.listdir(folder)) == ["0000004.pt", "0000005.pt", "0000009.pt"]

    def full_disk(obj, path):
        raise WriteError(errno.ENOSPC, f"cannot write checkpoint {path}: the disk is full")

    monkeypatch.setattr(run_outputs, "save_checkpoint", full_disk)
    with pytest.raises(SystemExit, match="the disk is full"):
        train.main([*args, "--max-steps", "6"])
    assert sorted(os.listdir(folder)) == ["0000004.pt", "0000005.pt", "0000009.pt"]  # nothing deleted for a write that failed
    assert train.parse_args([]).keep_last is None  # the default keeps every checkpoint


@pytest.mark.slow
def test_unreadable_images_are_skipped_and_counted(tmp_path, tiny_vae_dir):
    data = make_image_folder(tmp_path / "images", classes=2, per_class=4)
    (data / "class_0" / "img_0.png").write_bytes(b"\x89PNG broken")
    (data / "class_1" / "img_2.png").write_bytes(b"")
    # A global batch of all 8 images: the 2 broken files are drawn (and replaced) in step 1.
    train.main(train_args(data, tiny_vae_dir, tmp_path / "results", "--max-steps", "1", "--log-every", "1"))
    experiment = tmp_path / "results" / "000-DiT-S-8"
    assert read_metrics(experiment)[0]["skipped_images"] == 2
    log = (experiment / "log.txt").read_text()
    assert "unreadable images skipped so far: 2" in log and "skipping unreadable image" in log


@pytest.mark.parametrize(
    "change,message",
    [
        ({"--data-path": "MISSING"}, r"the data folder .*missing does not exist"),
        ({"--data-path": "EMPTY"}, r"the data folder .*empty holds no images"),
        ({"--data-path": None}, r"pass --data-path \(an image folder\) or --feature-path"),
        ({"--image-size": "100"}, r"--image-size 100 is not a positive multiple of 8 \(the VAE downsamples by 8\)"),
        ({"--image-size": "72"}, r"--image-size 72 gives 9x9 latents, which DiT-S/8 cannot cut into 8x8 patches; use a multiple of 64"),
        ({"--resume": "MISSING"}, r"--resume .*missing does not exist"),
        ({"--num-classes": "2"}, r"the data has 3 classes but --num-classes is 2"),
        ({"--global-batch-size": "32"}, r"the dataset has 24 images, fewer than --global-batch-size 32"),
        ({"--keep-last": "0"}, r"--keep-last must be at least 1 \(the newest checkpoint is always kept\), not 0"),
    ],
)
def test_bad_input_gets_one_sentence_before_any_work(tmp_path, image_folder, tiny_vae_dir, change, message):
    (tmp_path / "empty").mkdir()
    args = dict(zip(*[iter(train_args(image_folder, tiny_vae_dir, tmp_path / "results"))] * 2))
    for flag, value in change.items():
        args[flag] = {"MISSING": str(tmp_path / "missing"), "EMPTY": str(tmp_path / "empty")}.get(value, value)
    argv = [item for flag, value in args.items() if value is not None for item in (flag, value)]
    with pytest.raises(SystemExit, match=message):
        train.main(argv)
    assert not (tmp_path / "results").exists()


def test_global_batch_must_divide_by_the_world_size(image_folder):
    args = train.parse_args(["--data-path", str(image_folder), "--global-batch-size", "8"])
    with pytest.raises(SystemExit, match=r"--global-batch-size 8 is not divisible by the world size 3"):
        train.validate_args(args, world_size=3)


@pytest.mark.slow
def test_resume_with_another_global_batch_is_refused(tmp_path, five_steps, image_folder, tiny_vae_dir):
    args = train_args(image_folder, tiny_vae_dir, tmp_path, "--resume", str(five_steps / "checkpoints" / "0000005.pt"))
    args[args.index("--global-batch-size") + 1] = "4"
    with pytest.raises(SystemExit, match=r"it was trained with --global-batch-size 8 \(now 4\); resume with the same settings"):
        train.main(args)


# Regression pin: the SD-VAE path's losses for the tiny run below (one thread), recorded from a
# train.py without --ema-warmup, --no-flip or other autoencoders, which must leave this path as it is.
PINNED_LOSSES = [1.0542515516281128, 1.0626201629638672, 1.064855933189392]


@pytest.mark.slow
def test_sd_vae_losses_are_pinned_and_a_short_run_says_its_ema_is_young(tmp_path, image_folder, tiny_vae_dir, one_thread):
    train.main(train_args(image_folder, tiny_vae_dir, tmp_path, "--max-steps", "3", "--log-every", "1"))
    experiment = tmp_path / "000-DiT-S-8"
    assert [m["loss"] for m in read_metrics(experiment)] == pytest.approx(PINNED_LOSSES, rel=1e-6)
    log = (experiment / "log.txt").read_text()
    # 0.9999 ** 3 of the EMA is still its initial weights.
    assert (
        "the EMA weights still hold 100% of the initial weights after 3 steps (--ema-decay 0.9999); "
        "sample with --weights raw, or train with --ema-warmup or a lower --ema-decay"
    ) in log


@pytest.mark.slow
def test_ema_warmup_is_recorded_and_gives_a_trained_ema(tmp_path, image_folder, tiny_vae_dir, one_thread):
    train.main(train_args(image_folder, tiny_vae_dir, tmp_path, "--max-steps", "2", "--ema-warmup", "--no-flip"))
    experiment = tmp_path / "000-DiT-S-8"
    ckpt = torch.load(experiment / "checkpoints" / "0000002.pt", weights_only=True)
    assert ckpt["args"]["ema_warmup"] is True and ckpt["args"]["no_flip"] is True
    assert "the EMA weights still hold" not in (experiment / "log.txt").read_text()
    # Decays 0.1 then 2/11: the EMA of a zero-initialised bias is mostly the trained model's (about
    # 0.9 of it; at the plain 0.9999 it would be about 1e-4 of it).
    name = "final_layer.linear.bias"
    assert ckpt["ema"][name].norm() > 0.5 * ckpt["model"][name].norm() > 0
    with pytest.raises(SystemExit, match=r"--ema-warmup True \(now False\).*--no-flip True \(now False\)"):
        train.main(train_args(image_folder, tiny_vae_dir, tmp_path, "--max-steps", "3", "--resume", "auto"))


@pytest.mark.slow
def test_sigusr1_to_one_rank_stops_every_rank_at_the_same_step(tmp_path, image_folder, tiny_vae_dir):
    args = train_args(image_folder, tiny_vae_dir, tmp_path, "--log-every", "1", "--max-steps", "100000")
    job = start_torchrun(args)
    experiment = tmp_path / "000-DiT-S-8"
    wait_for_step(experiment, 1, job)
    os.kill(worker_pid(job.pid, rank=1), signal.SIGUSR1)  # SLURM's --signal=USR1@N; here only rank 1 gets it
    output = job.communicate(timeout=120)[0]
    (checkpoint,) = os.listdir(experiment / "checkpoints")
    assert torch.load(experiment / "checkpoints" / checkpoint, weights_only=True)["world_size"] == 2
    assert f"stopped by SIGUSR1 after step {int(checkpoint.split('.')[0])}" in (experiment / "log.txt").read_text(), output[-3000:]
    assert job.returncode != 0 and re.search(r"exitcode\s*:\s*138", output)  # 128 + SIGUSR1, as an uncaught one gives


@pytest.mark.slow
def test_a_new_run_never_reuses_a_folder(tmp_path, image_folder, tiny_vae_dir):
    (tmp_path / "001-DiT-S-8").mkdir()  # 000 was deleted; 001 holds another run
    (tmp_path / "001-DiT-S-8" / "log.txt").write_text("another run\n")
    train.main(train_args(image_folder, tiny_vae_dir, tmp_path, "--max-steps", "1"))
    assert sorted(os.listdir(tmp_path)) == ["001-DiT-S-8", "002-DiT-S-8"]
    assert (tmp_path / "001-DiT-S-8" / "log.txt").read_text() == "another run\n"


@pytest.mark.slow
def test_checkpoints_are_group_readable(three_checkpoints):
    from util.files import current_umask

    paths = list((three_checkpoints / "000-DiT-S-8" / "checkpoints").iterdir())
    assert len(paths) == 3 and all(path.stat().st_mode & 0o777 == 0o666 & ~current_umask() for path in paths)
    assert current_umask() != 0o022 or all(path.stat().st_mode & 0o777 == 0o644 for path in paths)


def test_a_read_only_results_folder_is_one_sentence_before_any_work(tmp_path, image_folder, tiny_vae_dir):
    with tmpfs(tmp_path / "fs", "1m") as fs:
        make_read_only(fs)
        with pytest.raises(SystemExit, match=rf"^--results-dir {fs}/results is not writable \({fs} is read-only or lacks write permission\)$"):
            train.main(train_args(image_folder, tiny_vae_dir, fs / "results"))


@pytest.mark.slow
def test_a_full_disk_at_a_checkpoint_is_one_sentence_and_keeps_the_previous_one(tmp_path, image_folder, tiny_vae_dir, monkeypatch):
    from util import checkpoints as checkpoint

    real_save = torch.save
    calls = []

    def save_then_fill_up(obj, f):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        real_save(obj, f)

    monkeypatch.setattr(checkpoint.torch, "save", save_then_fill_up)
    with pytest.raises(SystemExit, match=r"^cannot write checkpoint .*0000002.pt: the disk is full \(torch.save could not write all bytes\); free some space and run again$"):
        train.main(train_args(image_folder, tiny_vae_dir, tmp_path, "--max-steps", "3", "--ckpt-every", "1"))
    assert os.listdir(tmp_path / "000-DiT-S-8" / "checkpoints") == ["0000001.pt"]


@pytest.mark.parametrize(
    "change,message",
    [
        ({"--sample-steps": "2000"}, r"--sample-steps must be between 1 and 1000 \(the diffusion's steps\), not 2000"),
        ({"--sample-steps": "0"}, r"--sample-steps must be between 1 and 1000 \(the diffusion's steps\), not 0"),
        ({"--global-batch-size": "0"}, r"--global-batch-size must be at least 1, not 0"),
        ({"--lr": "-1"}, r"--lr must be a finite number of 0 or more, not -1.0"),
        ({"--lr": "nan"}, r"--lr must be a finite number of 0 or more, not nan"),
        ({"--ema-decay": "2"}, r"--ema-decay must be between 0 and 1, not 2.0"),
        ({"--ema-decay": "nan"}, r"--ema-decay must be between 0 and 1, not nan"),
        ({"--max-steps": "-1"}, r"--max-steps must be 0 or more, not -1"),
        ({"--epochs": "0"}, r"--epochs must be at least 1, not 0"),
        ({"--num-workers": "-2"}, r"--num-workers must be 0 or more, not -2"),
        ({"--sample-every": "-5"}, r"--sample-every must be 0 \(never\) or more, not -5"),
        ({"--num-classes": "0"}, r"--num-classes must be at least 1, not 0"),
        ({"--results-dir": "FILE"}, r"--results-dir .*a_file is a file, not a folder"),
        ({"--feature-path": "FILE", "--data-path": None}, r"--feature-path .*a_file is a file, not a folder"),
        ({"--feature-path": "DIR"}, r"pass either --data-path \(images\) or --feature-path \(features made by extract_features.py\), not both"),
    ],
)
def test_bad_flags_are_one_sentence_before_any_folder_or_work(tmp_path, image_folder, tiny_vae_dir, monkeypatch, change, message):
    (tmp_path / "a_file").write_text("")
    args = dict(zip(*[iter(train_args(image_folder, tiny_vae_dir, tmp_path / "results"))] * 2))
    for flag, value in change.items():
        args[flag] = {"FILE": str(tmp_path / "a_file"), "DIR": str(tmp_path)}.get(value, value)
    argv = [item for flag, value in args.items() if value is not None for item in (flag, value)]

    def no_work(*a, **k):
        raise AssertionError("work started before the flags were checked")

    monkeypatch.setattr(train, "open_dataset", no_work)
    with pytest.raises(SystemExit, match=rf"^{message}$"):
        train.main(argv)
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
def test_training_from_features_without_sample_grids_loads_no_vae(tmp_path, store32, monkeypatch):
    def no_vae(*a, **k):
        raise AssertionError("the VAE was loaded")

    monkeypatch.setattr(train, "load_autoencoder", no_vae)
    # The hub VAE named by default is never fetched (offline, this took 28.8 s of retries before failing).
    train.main(["--feature-path", str(store32), "--results-dir", str(tmp_path), *TINY, "--max-steps", "1"])
    log = (tmp_path / "000-DiT-S-8" / "log.txt").read_text()
    assert "no VAE loaded: training from features" in log
    meta = json.loads((store32 / "meta.json").read_text())
    assert meta["vae"] in log


@pytest.mark.slow
def test_one_sampling_step_is_allowed_for_the_sample_grids(tmp_path, image_folder, tiny_vae_dir):
    # 1 is inside the checked range 1..1000 and gives a grid (it used to crash at the first grid).
    train.main(train_args(image_folder, tiny_vae_dir, tmp_path, "--max-steps", "1", "--sample-every", "1", "--sample-steps", "1"))
    assert os.listdir(tmp_path / "000-DiT-S-8" / "samples") == ["0000001.png"]


@pytest.mark.slow
def test_a_really_full_disk_at_the_first_checkpoint_is_one_sentence(tmp_path, image_folder, tiny_vae_dir):
    # Results on a 1 MB tmpfs: the log and metrics fit, a DiT-S/8 checkpoint (~0.5 GB) does not.
    with tmpfs(tmp_path / "fs", "1m") as fs:
        with pytest.raises(SystemExit, match=rf"^cannot write checkpoint {fs}/000-DiT-S-8/checkpoints/0000002.pt: the disk is full \(.+\); free some space and run again$"):
            train.main(train_args(image_folder, tiny_vae_dir, fs, "--max-steps", "2", "--log-every", "1"))
        assert os.listdir(fs / "000-DiT-S-8" / "checkpoints") == []  # no temporary left behind
        assert [m["step"] for m in read_metrics(fs / "000-DiT-S-8")] == [1, 2]
        assert "the disk is full" in (fs / "000-DiT-S-8" / "log.txt").read_text()


@pytest.mark.slow
def test_train_py_with_accumulation_records_the_split(tmp_path, image_folder, tiny_vae_dir):
    args = train_args(image_folder, tiny_vae_dir, tmp_path, "--max-steps", "2", "--log-every", "1", "--grad-accum-steps", "4")
    run_script(["train.py", *args])
    experiment = tmp_path / "000-DiT-S-8"
    metrics = read_metrics(experiment)
    assert [m["step"] for m in metrics] == [1, 2]  # logs per optimizer step, not per micro-batch
    assert all(m["images_per_sec"] == pytest.approx(8 * m["steps_per_sec"]) for m in metrics)
    ckpt = torch.load(experiment / "checkpoints" / "0000002.pt", weights_only=True)
    assert (ckpt["step"], ckpt["epoch_step"], ckpt["grad_accum_steps"], ckpt["micro_batch_size"]) == (2, 2, 4, 2)
    assert "global batch 8 = 2 images x 4 micro-batches x 1 process(es)" in (experiment / "log.txt").read_text()


def test_global_batch_must_divide_by_processes_times_accumulation(image_folder):
    args = train.parse_args(["--data-path", str(image_folder), "--global-batch-size", "8", "--grad-accum-steps", "3"])
    with pytest.raises(SystemExit, match=r"--global-batch-size 8 is not divisible by the world size 2 times --grad-accum-steps 3"):
        train.validate_args(args, world_size=2)
    args.grad_accum_steps = 0
    with pytest.raises(SystemExit, match=r"--grad-accum-steps must be at least 1"):
        train.validate_args(args, world_size=1)


def mixed_folder(root) -> str:
    """Eight images of assorted modes and shapes directly in root: no class folders."""
    rng = np.random.default_rng(0)
    root.mkdir()
    for k in range(8):
        h, w = rng.integers(50, 120, size=2)
        channels = {0: (), 1: (3,), 2: (4,), 3: (3,)}[k % 4]
        Image.fromarray(rng.integers(0, 256, size=(h, w, *channels), dtype=np.uint8)).save(root / f"img_{k}.png")
    return str(root)


def unconditional_args(data: str, vae, results, *extra: str) -> list[str]:
    return [
        "--data-path", data, "--vae-path", str(vae), "--results-dir", str(results), "--model", "DiT-S/8",
        "--image-size", "64", "--num-classes", "1", "--class-dropout-prob", "0", "--global-batch-size", "4",
        "--num-workers", "0", *extra,
    ]


@pytest.mark.slow
def test_unconditional_training_on_a_folder_without_classes(tmp_path, tiny_vae_dir):
    data = mixed_folder(tmp_path / "images")
    train.main(unconditional_args(data, tiny_vae_dir, tmp_path / "results", "--max-steps", "2", "--log-every", "1",
                                  "--sample-every", "2", "--sample-steps", "2"))
    experiment = tmp_path / "results" / "000-DiT-S-8"
    ckpt = torch.load(experiment / "checkpoints" / "0000002.pt", weights_only=True)
    # One class and no null label: a label table of one row, and no guidance in the sample grid.
    assert ckpt["ema"]["y_embedder.embedding_table.weight"].shape == (1, 384)
    assert ckpt["args"]["class_dropout_prob"] == 0 and ckpt["args"]["num_classes"] == 1
    DiT_models["DiT-S/8"](input_size=8, num_classes=1, class_dropout_prob=0).load_state_dict(ckpt["ema"])
    assert [m["step"] for m in read_metrics(experiment)] == [1, 2]
    assert all(0.5 < m["loss"] < 2 for m in read_metrics(experiment))
    assert Image.open(experiment / "samples" / "0000002.png").size == (4 * 64 + 5 * 2, 2 * 64 + 3 * 2)

    # The null label cannot appear on resume: one sentence.
    resume = unconditional_args(data, tiny_vae_dir, tmp_path / "results", "--resume", str(experiment / "checkpoints" / "0000002.pt"))
    resume[resume.index("--class-dropout-prob") + 1] = "0.1"
    with pytest.raises(SystemExit, match=r"it was trained with no null label \(--class-dropout-prob 0.1 now\)"):
        train.main(resume)


@pytest.mark.parametrize(
    "flag,value,message",
    [("--num-classes", "0", r"--num-classes must be at least 1"), ("--class-dropout-prob", "1", r"--class-dropout-prob must lie in \[0, 1\), got 1.0")],
)
def test_bad_class_settings_get_one_sentence(tmp_path, tiny_vae_dir, flag, value, message):
    args = unconditional_args(str(tmp_path), tiny_vae_dir, tmp_path / "results")
    args[args.index(flag) + 1] = value
    with pytest.raises(SystemExit, match=message):
        train.main(args)


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_pixel_space_checkpoint_samples_with_only_its_path(tmp_path, image_folder, one_thread):
    """train.py --vae none, then sample.py and sample_ddp.py given --ckpt alone: model, image
    size, classes and pixel space come from the checkpoint, and the images have its size."""
    import sample
    import sample_ddp

    args = ["--data-path", str(image_folder), "--results-dir", str(tmp_path / "results"), *TINY, "--vae", "none"]
    args[args.index("--image-size") + 1] = "32"
    train.main([*args, "--max-steps", "2"])
    ckpt = str(tmp_path / "results" / "000-DiT-S-8" / "checkpoints" / "0000002.pt")

    grid = tmp_path / "grid.png"
    sample.main(["--ckpt", ckpt, "--num-sampling-steps", "2", "--class-labels", "0", "1", "--out", str(grid)])
    assert Image.open(grid).size == (2 * 32 + 3 * 2, 32 + 2 * 2)  # 2 images of 32 px in a padded row

    samples = tmp_path / "samples"
    sample_ddp.main(["--ckpt", ckpt, "--num-sampling-steps", "2", "--num-fid-samples", "3",
                     "--per-proc-batch-size", "2", "--sample-dir", str(samples)])
    (npz,) = samples.glob("*.npz")
    with np.load(npz) as arrays:
        assert arrays["arr_0"].shape == (3, 32, 32, 3) and arrays["arr_1"].shape == (3,)
        assert set(arrays["arr_1"].tolist()) <= {0, 1, 2}  # the checkpoint's 3 classes


@pytest.mark.slow
def test_a_class_of_105_unreadable_files_trains_resumes_and_accepts_their_removal(tmp_path, tiny_vae_dir):
    data = make_image_folder(tmp_path / "images")
    head = (data / "class_1" / "img_0.png").read_bytes()[:50]
    for i in range(105):  # a partial copy: `head -c 50 img.png`, listed before class_1's images
        (data / "class_1" / f"broken_{i:03d}.png").write_bytes(head)
    args = train_args(data, tiny_vae_dir, tmp_path / "results", "--log-every", "1", "--ckpt-every", "2", "--resume", "auto")
    train.main([*args, "--max-steps", "2"])
    train.main([*args, "--max-steps", "4"])
    experiment = tmp_path / "results" / "000-DiT-S-8"
    metrics = read_metrics(experiment)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert metrics[1]["skipped_images"] > 0 and metrics[3]["skipped_images"] > 0  # each process counts its own

    for broken in (data / "class_1").glob("broken_*.png"):
        broken.unlink()
    with pytest.raises(SystemExit, match=r"^cannot resume from .*0000004.pt: it was trained with --data-path .*images as it was then \(its files differ now\), a dataset of 129 images \(now 24\); resume with the same settings, or pass --accept-changed-data to continue on the data as it is now$"):
        train.main([*args, "--max-steps", "5"])
    train.main([*args, "--max-steps", "5", "--accept-changed-data"])
    log = (experiment / "log.txt").read_text()
    assert "--accept-changed-data: continuing on other data than the checkpoint was trained with: --data-path" in log
    assert "a dataset of 129 images (now 24)" in log and "step 5 starts epoch 1" in log
    last = read_metrics(experiment)[-1]
    assert (last["step"], last["skipped_images"]) == (5, 0)


def test_a_folder_of_no_readable_image_is_one_sentence_before_any_folder(tmp_path, tiny_vae_dir):
    images = make_unreadable_image_folder(tmp_path / "images")
    with pytest.raises(SystemExit, match=r"^none of the 1 image files in the data folder .*images can be read \(the first, .*a.png: "):
        train.main(train_args(images, tiny_vae_dir, tmp_path / "results"))
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
def test_a_second_job_on_a_running_run_is_refused_naming_the_holder(tmp_path, image_folder, tiny_vae_dir):
    from util.run_lock import RunLock

    args = train_args(image_folder, tiny_vae_dir, tmp_path, "--log-every", "1", "--resume", "auto")
    train.main([*args, "--max-steps", "1"])
    experiment = tmp_path / "000-DiT-S-8"
    before = (experiment / "metrics.jsonl").read_text()
    with RunLock(str(experiment)) as running:  # the job that trains in it (this process)
        since = running.holder["since"]
        with pytest.raises(SystemExit, match=rf"^{experiment} is in use by another job \(process {os.getpid()} on host \S+, since {since}\); wait for that job to end or stop it \(its lock {experiment}/lock is taken over once the job is gone: .*\)$"):
            train.main([*args, "--max-steps", "3"])
    assert (experiment / "metrics.jsonl").read_text() == before and os.listdir(experiment / "checkpoints") == ["0000001.pt"]
    assert os.listdir(tmp_path) == ["000-DiT-S-8"] and not (experiment / "lock").exists()


@pytest.mark.slow
def test_the_same_command_twice_under_torchrun_refuses_the_second_on_every_rank(tmp_path, image_folder, tiny_vae_dir):
    args = train_args(image_folder, tiny_vae_dir, tmp_path, "--log-every", "1", "--ckpt-every", "1", "--resume", "auto", "--max-steps", "100000")
    first = start_torchrun(args)
    experiment = tmp_path / "000-DiT-S-8"
    wait_for_step(experiment, 2, first)
    second = start_torchrun(args)  # a requeued job beside its old self
    output = second.communicate(timeout=120)[0]  # every rank stops: none waits for the other
    assert second.returncode != 0 and first.poll() is None
    assert re.search(rf"{experiment} is in use by another job \(process \d+ on host \S+, since \S+\); wait for that job to end or stop it", output), output[-3000:]
    os.killpg(first.pid, signal.SIGTERM)
    first.communicate(timeout=120)
    steps = [m["step"] for m in read_metrics(experiment)]
    assert steps == list(range(1, len(steps) + 1))  # one writer: no step twice, none lost
    assert os.listdir(tmp_path) == ["000-DiT-S-8"] and not (experiment / "lock").exists()


@pytest.mark.slow
@pytest.mark.parametrize("error,where", [(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"), "GPU"), (MemoryError(), "host")])
def test_running_out_of_memory_in_a_step_is_one_sentence_with_the_flags_that_help(tmp_path, image_folder, tiny_vae_dir, monkeypatch, error, where):
    def step_out_of_memory(*args, **kwargs):
        raise error

    monkeypatch.setattr(train, "accumulated_step", step_out_of_memory)
    with pytest.raises(SystemExit, match=rf"^out of {where} memory in a training step of 8 images per micro-batch \(.+\); use smaller micro-batches with a higher --grad-accum-steps \(now 1\) or recompute activations with --grad-checkpointing$"):
        train.main(train_args(image_folder, tiny_vae_dir, tmp_path, "--max-steps", "2"))
    assert not (tmp_path / "000-DiT-S-8" / "lock").exists()


@pytest.mark.slow
def test_a_run_folder_deleted_while_training_is_one_sentence(tmp_path, image_folder, tiny_vae_dir, monkeypatch):
    real_log_metrics = train.log_metrics

    def delete_then_log(run, state, stats):
        if state.step == 2:
            shutil.rmtree(run.experiment_dir)  # a clean-up script, or a wrong rm -r
        real_log_metrics(run, state, stats)

    monkeypatch.setattr(train, "log_metrics", delete_then_log)
    experiment = tmp_path / "000-DiT-S-8"
    with pytest.raises(SystemExit, match=rf"^cannot append to {experiment}/metrics.jsonl: the folder {experiment} no longer exists \(moved or deleted while this ran\)$"):
        train.main(train_args(image_folder, tiny_vae_dir, tmp_path, "--max-steps", "3", "--log-every", "1"))


@pytest.mark.slow
def test_a_disk_full_from_the_start_is_one_sentence(tmp_path, image_folder, tiny_vae_dir, capsys):
    with tmpfs(tmp_path / "fs", "1m") as fs:
        with open(fs / "filler", "wb", buffering=0) as f, pytest.raises(OSError):
            while True:
                f.write(b"x" * 65536)
        with pytest.raises(SystemExit) as stopped:
            train.main(train_args(image_folder, tiny_vae_dir, fs / "results", "--max-steps", "2", "--log-every", "1"))
        assert re.fullmatch(rf"cannot .* {fs}/results\S*: the disk is full \(.+\); free some space and run again", str(stopped.value))
        assert "Logging error" not in capsys.readouterr().err


def start_python(args: list[str]) -> subprocess.Popen:
    """train.py as one plain process in a session of its own."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "train.py", *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP])
def test_ctrl_c_and_sighup_stop_a_plain_python_run_like_sigterm(tmp_path, image_folder, tiny_vae_dir, sig):
    job = start_python(train_args(image_folder, tiny_vae_dir, tmp_path, "--log-every", "1", "--max-steps", "100000"))
    experiment = tmp_path / "000-DiT-S-8"
    wait_for_step(experiment, 2, job)
    os.killpg(job.pid, sig)  # Ctrl-C or a closed terminal signals the whole foreground group
    output = job.communicate(timeout=120)[0]
    assert job.returncode == 128 + sig, output[-3000:]
    (checkpoint,) = os.listdir(experiment / "checkpoints")
    log = (experiment / "log.txt").read_text()
    assert f"stopped by {sig.name} after step {int(checkpoint.split('.')[0])}: saved checkpoint {experiment}/checkpoints/{checkpoint}; continue with --resume auto" in log
    assert "KeyboardInterrupt" not in output and not (experiment / "lock").exists()


@pytest.mark.slow
def test_ctrl_c_to_a_torchrun_job_saves_on_every_rank(tmp_path, image_folder, tiny_vae_dir):
    job = start_torchrun(train_args(image_folder, tiny_vae_dir, tmp_path, "--log-every", "1", "--max-steps", "100000"))
    experiment = tmp_path / "000-DiT-S-8"
    wait_for_step(experiment, 2, job)
    os.killpg(job.pid, signal.SIGINT)  # Ctrl-C: torchrun and both ranks get it, then torchrun relays it to the ranks
    output = job.communicate(timeout=120)[0]
    (checkpoint,) = os.listdir(experiment / "checkpoints")
    assert f"stopped by SIGINT after step {int(checkpoint.split('.')[0])}" in (experiment / "log.txt").read_text(), output[-3000:]
    # The one traceback is torchrun's own report of the signal it got (docs/training.md), none from training.
    assert job.returncode == 1 and output.count("Traceback") == 1, output[-3000:]
    assert re.search(r"SignalException: Process \d+ got signal: 2\n", output) and "KeyboardInterrupt" not in output
