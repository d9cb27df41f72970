"""train.py under the faults of long cluster jobs: stop signals under torchrun, damaged or
orphaned checkpoint files, metrics written twice, run folders, bad flags and mixed-up resumes.

Same tiny set-up as test_train.py: DiT-S/8 on 64 px images of 3 classes with the tiny VAE.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from conftest import REPO
from test_extract_features import store32  # noqa: F401  (a float32 feature store of the 24 test images)
from conftest import make_read_only, tmpfs
from conftest import TINY, assert_state_dicts_equal, read_metrics, run_script, train_args


def start_torchrun(args: list[str], nproc: int = 2) -> subprocess.Popen:
    """train.py under torchrun in a session of its own, like a scheduler's job."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train.py", *args]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for_step(experiment: Path, step: int, process: subprocess.Popen, timeout: float = 240) -> None:
    metrics = experiment / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, f"the run ended early:\n{process.stdout.read()[-3000:]}"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= step:
            return
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within {timeout} s")


def worker_pid(torchrun_pid: int, rank: int) -> int:
    """The pid of the train.py process of `rank` that torchrun started."""
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            parent = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
            if parent == torchrun_pid and f"RANK={rank}".encode() in environ:
                return int(pid)
    raise AssertionError(f"no rank {rank} under torchrun {torchrun_pid}")


def assert_same_training_state(a: Path, b: Path) -> None:
    ours, reference = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert_state_dicts_equal(ours["model"], reference["model"])
    assert_state_dicts_equal(ours["ema"], reference["ema"])
    for x, y in zip(ours["opt"]["state"].values(), reference["opt"]["state"].values()):
        assert_state_dicts_equal(x, y)
    for x, y in zip(ours["rng"], reference["rng"]):
        assert torch.equal(x["cpu"], y["cpu"])


# ----------------------------------------------------------------------------------------
# Stop signals
# ----------------------------------------------------------------------------------------


def test_sigterm_to_a_torchrun_job_saves_and_resume_auto_continues_bitwise(tmp_path, image_folder, tiny_vae_dir):
    args = train_args(image_folder, tiny_vae_dir, tmp_path / "stopped", "--log-every", "1", "--num-workers", "1", "--resume", "auto")
    job = start_torchrun([*args, "--max-steps", "100000"])
    experiment = tmp_path / "stopped" / "000-DiT-S-8"
    wait_for_step(experiment, 2, job)
    os.killpg(job.pid, signal.SIGTERM)  # as a scheduler does: torchrun, the ranks and their loader workers
    output = job.communicate(timeout=120)[0]
    assert job.returncode != 0, output[-3000:]
    (checkpoint,) = os.listdir(experiment / "checkpoints")
    stopped_at = int(checkpoint.split(".")[0])
    log = (experiment / "log.txt").read_text()
    assert f"stopped by SIGTERM after step {stopped_at}: saved checkpoint {experiment}/checkpoints/{checkpoint}; continue with --resume auto" in log
    assert [m["step"] for m in read_metrics(experiment)] == list(range(1, stopped_at + 1))

    total = stopped_at + 2
    run_script(["train.py", *args, "--max-steps", str(total)], nproc=2)
    reference = tmp_path / "reference"
    run_script(["train.py", *train_args(image_folder, tiny_vae_dir, reference, "--log-every", "1", "--max-steps", str(total))], nproc=2)
    assert os.listdir(tmp_path / "stopped") == ["000-DiT-S-8"]
    assert_same_training_state(experiment / "checkpoints" / f"{total:07d}.pt", reference / "000-DiT-S-8" / "checkpoints" / f"{total:07d}.pt")
    # One record per step, and the same losses as the uninterrupted run.
    assert [m["loss"] for m in read_metrics(experiment)] == [m["loss"] for m in read_metrics(reference / "000-DiT-S-8")]


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


# ----------------------------------------------------------------------------------------
# Damaged and orphaned files at resume
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def three_checkpoints(tmp_path_factory, image_folder, tiny_vae_dir) -> Path:
    """A run with checkpoints at steps 2, 4 and 6 (one process)."""
    results = tmp_path_factory.mktemp("three")
    train.main(train_args(image_folder, tiny_vae_dir, results, "--max-steps", "6", "--log-every", "1", "--ckpt-every", "2"))
    return results


def test_resume_auto_skips_a_truncated_newest_checkpoint_and_cleans_up(tmp_path, three_checkpoints, image_folder, tiny_vae_dir, caplog):
    results = tmp_path / "results"
    shutil.copytree(three_checkpoints, results)
    experiment = results / "000-DiT-S-8"
    newest = experiment / "checkpoints" / "0000006.pt"
    newest.write_bytes(newest.read_bytes()[:5000])  # killed mid-copy, or a disk error
    (experiment / "checkpoints" / ".tmp-k1ll3d.pt").write_bytes(b"x" * 1000)  # a write a kill interrupted
    train.main(train_args(image_folder, tiny_vae_dir, results, "--max-steps", "6", "--log-every", "1", "--resume", "auto"))

    log = (experiment / "log.txt").read_text()
    assert f"skipping checkpoint {newest}: it does not load (" in log and "so it can be deleted" in log
    assert f"resuming from {experiment}/checkpoints/0000004.pt at step 4" in log
    assert f"removed 1 stale temporary checkpoint file(s): {experiment}/checkpoints/.tmp-k1ll3d.pt" in log
    assert sorted(os.listdir(experiment / "checkpoints")) == ["0000002.pt", "0000004.pt", "0000006.pt"]
    assert [m["step"] for m in read_metrics(experiment)] == [1, 2, 3, 4, 5, 6]  # no step twice
    assert_same_training_state(newest, three_checkpoints / "000-DiT-S-8" / "checkpoints" / "0000006.pt")


def test_resume_auto_with_no_loadable_checkpoint_is_one_sentence(tmp_path, image_folder, tiny_vae_dir):
    (tmp_path / "000-DiT-S-8" / "checkpoints").mkdir(parents=True)
    (tmp_path / "000-DiT-S-8" / "checkpoints" / "0000002.pt").write_bytes(b"garbage")
    with pytest.raises(SystemExit, match=r"^none of the 1 checkpoints loads \(the newest is .*0000002.pt\); delete them, or pass --resume PATH to a checkpoint to resume from$"):
        train.main(train_args(image_folder, tiny_vae_dir, tmp_path, "--resume", "auto"))


def test_a_new_run_never_reuses_a_folder(tmp_path, image_folder, tiny_vae_dir):
    (tmp_path / "001-DiT-S-8").mkdir()  # 000 was deleted; 001 holds another run
    (tmp_path / "001-DiT-S-8" / "log.txt").write_text("another run\n")
    train.main(train_args(image_folder, tiny_vae_dir, tmp_path, "--max-steps", "1"))
    assert sorted(os.listdir(tmp_path)) == ["001-DiT-S-8", "002-DiT-S-8"]
    assert (tmp_path / "001-DiT-S-8" / "log.txt").read_text() == "another run\n"


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


# ----------------------------------------------------------------------------------------
# Bad flags and resumes that would mix experiments
# ----------------------------------------------------------------------------------------


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


@pytest.mark.parametrize(
    "change,message",
    [
        ({"--ema-decay": "0.999"}, r"--ema-decay 0.9999 \(now 0.999\)"),
        ({"--data-path": "OTHER"}, r"--data-path .*images.* \(now .*other_images\)"),
    ],
)
def test_resume_with_other_data_or_ema_decay_is_refused(tmp_path, three_checkpoints, image_folder, tiny_vae_dir, change, message):
    from conftest import make_image_folder

    other = make_image_folder(tmp_path / "other_images", seed=1)
    args = train_args(image_folder, tiny_vae_dir, three_checkpoints, "--resume", "auto", "--max-steps", "7")
    for flag, value in change.items():
        args += [flag, str(other) if value == "OTHER" else value]  # the last occurrence wins
    with pytest.raises(SystemExit, match=rf"^cannot resume from .*0000006.pt: it was trained with {message}; resume with the same settings"):
        train.main(args)


def test_resume_with_another_lr_continues_and_says_so(tmp_path, three_checkpoints, image_folder, tiny_vae_dir):
    results = tmp_path / "results"
    shutil.copytree(three_checkpoints, results)
    train.main(train_args(image_folder, tiny_vae_dir, results, "--resume", "auto", "--max-steps", "7", "--log-every", "1", "--lr", "5e-5"))
    experiment = results / "000-DiT-S-8"
    assert "--lr changed from 0.0001 (the checkpoint's) to 5e-05: continuing with 5e-05" in (experiment / "log.txt").read_text()
    assert read_metrics(experiment)[-1]["lr"] == 5e-5 and read_metrics(experiment)[-1]["step"] == 7


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


def test_one_sampling_step_is_allowed_for_the_sample_grids(tmp_path, image_folder, tiny_vae_dir):
    # 1 is inside the checked range 1..1000 and gives a grid (it used to crash at the first grid).
    train.main(train_args(image_folder, tiny_vae_dir, tmp_path, "--max-steps", "1", "--sample-every", "1", "--sample-steps", "1"))
    assert os.listdir(tmp_path / "000-DiT-S-8" / "samples") == ["0000001.png"]


def test_a_really_full_disk_at_the_first_checkpoint_is_one_sentence(tmp_path, image_folder, tiny_vae_dir):
    # Results on a 1 MB tmpfs: the log and metrics fit, a DiT-S/8 checkpoint (~0.5 GB) does not.
    with tmpfs(tmp_path / "fs", "1m") as fs:
        with pytest.raises(SystemExit, match=rf"^cannot write checkpoint {fs}/000-DiT-S-8/checkpoints/0000002.pt: the disk is full \(.+\); free some space and run again$"):
            train.main(train_args(image_folder, tiny_vae_dir, fs, "--max-steps", "2", "--log-every", "1"))
        assert os.listdir(fs / "000-DiT-S-8" / "checkpoints") == []  # no temporary left behind
        assert [m["step"] for m in read_metrics(fs / "000-DiT-S-8")] == [1, 2]
        assert "the disk is full" in (fs / "000-DiT-S-8" / "log.txt").read_text()


def test_a_full_disk_at_a_metrics_line_stops_and_resume_finishes(tmp_path, image_folder, tiny_vae_dir, monkeypatch):
    import builtins
    import errno

    from util import files as checkpoint

    appends = []

    def open_that_fills_up(path, mode="r", *args, **kwargs):
        if str(path).endswith("metrics.jsonl") and mode == "a":
            appends.append(path)
            if len(appends) == 2:  # the record of step 2
                raise OSError(errno.ENOSPC, "No space left on device")
        return builtins.open(path, mode, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "open", open_that_fills_up, raising=False)
    args = train_args(image_folder, tiny_vae_dir, tmp_path, "--max-steps", "3", "--log-every", "1", "--ckpt-every", "1", "--resume", "auto")
    with pytest.raises(SystemExit, match=r"^cannot append to .*metrics.jsonl: the disk is full \(No space left on device\); free some space and run again$"):
        train.main(args)
    experiment = tmp_path / "000-DiT-S-8"
    assert os.listdir(experiment / "checkpoints") == ["0000001.pt"]  # stopped at once, not after more steps
    monkeypatch.undo()  # space freed
    train.main(args)
    assert [m["step"] for m in read_metrics(experiment)] == [1, 2, 3]
