"""util/resume.py and train.py's resumes: on another number of processes or another accumulation
split, with the same global batch, the run continues at the same step and at the same place of
the epoch's data order; --resume auto takes the newest checkpoint that loads, after a SIGTERM
under torchrun as after a damaged file or a full disk; settings that would mix experiments are
refused, another learning rate is taken and reported.

(Resuming on the same number of processes is bitwise exact: test_train.py.)
"""
from __future__ import annotations

import os
import shutil
import signal
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image

import train
from conftest import (
    TINY, assert_state_dicts_equal, make_image_folder, read_metrics, run_script, start_torchrun,
    train_args, wait_for_step
)
from util import checkpoints as checkpoint, data
from util.checkpoints import save_checkpoint
from util.resume import checkpoints_newest_first, load_newest_good_checkpoint, seed_for_step


def record_items(monkeypatch) -> list[tuple[int, int]]:
    """The (index, flip) items the training set is asked for, in order (in this process)."""
    items: list[tuple[int, int]] = []
    original = data.ImageDataset.__getitem__

    def recording(self, item):
        items.append(tuple(item))
        return original(self, item)

    monkeypatch.setattr(data.ImageDataset, "__getitem__", recording)
    return items


def epoch_order(epoch: int) -> list[tuple[int, int]]:
    """The epoch's (index, flip) order as one process with seed 0 takes it: global batch k is items k*8 to k*8+7."""
    return data.EpochSampler(24, 0, 1, seed=0).epoch_items(epoch)


@pytest.mark.slow
def test_two_processes_resume_on_one_at_the_same_place_of_the_data(tmp_path, image_folder, tiny_vae_dir, monkeypatch):
    args = train_args(image_folder, tiny_vae_dir, tmp_path, "--log-every", "1")
    # Steps 1-2 (global batches 0 and 1 of epoch 0) on 2 processes x 2 micro-batches of 2 images.
    run_script(["train.py", *args, "--max-steps", "2", "--grad-accum-steps", "2"], nproc=2)
    experiment = tmp_path / "000-DiT-S-8"
    checkpoint = experiment / "checkpoints" / "0000002.pt"

    items = record_items(monkeypatch)
    train.main([*args, "--max-steps", "5", "--grad-accum-steps", "2", "--resume", str(checkpoint)])
    # Step 3 takes the last global batch of epoch 0, steps 4 and 5 the first two of epoch 1: the
    # 24 images of epoch 0 were each seen once, over the two runs.
    assert items == epoch_order(0)[16:24] + epoch_order(1)[:16]

    ckpt = torch.load(experiment / "checkpoints" / "0000005.pt", weights_only=True)
    assert (ckpt["step"], ckpt["epoch"], ckpt["epoch_step"], ckpt["world_size"], ckpt["grad_accum_steps"]) == (5, 1, 2, 1, 2)
    assert [m["step"] for m in read_metrics(experiment)] == [1, 2, 3, 4, 5]
    assert all(0.5 < m["loss"] < 2 for m in read_metrics(experiment))
    log = (experiment / "log.txt").read_text()
    assert "resuming from" in log and "at step 2 (epoch 0, batch 2 of the epoch), trained with 2 process(es) x 2 micro-batches" in log
    assert "trained by 2 process(es), now 1: the data order continues as it was, random draws start anew" in log


@pytest.mark.slow
def test_one_process_resumes_on_two(tmp_path, image_folder, tiny_vae_dir):
    args = train_args(image_folder, tiny_vae_dir, tmp_path, "--log-every", "1")
    train.main([*args, "--max-steps", "1", "--grad-accum-steps", "4"])
    experiment = tmp_path / "000-DiT-S-8"
    run_script(["train.py", *args, "--max-steps", "4", "--resume", "auto"], nproc=2)
    ckpt = torch.load(experiment / "checkpoints" / "0000004.pt", weights_only=True)
    assert (ckpt["step"], ckpt["epoch"], ckpt["epoch_step"], ckpt["world_size"], ckpt["grad_accum_steps"]) == (4, 1, 1, 2, 1)
    assert len(ckpt["rng"]) == 2 and not torch.equal(ckpt["rng"][0]["cpu"], ckpt["rng"][1]["cpu"])
    assert [m["step"] for m in read_metrics(experiment)] == [1, 2, 3, 4]
    assert "trained by 1 process(es), now 2" in (experiment / "log.txt").read_text()


def test_new_random_draws_depend_on_seed_step_and_rank_alone():
    seed = seed_for_step(0, 10, 1)
    assert seed == seed_for_step(0, 10, 1) and 0 <= seed < 2**64
    others = {seed_for_step(*key) for key in [(1, 10, 1), (0, 11, 1), (0, 10, 0)]}
    assert seed not in others and len(others) == 3


def test_checkpoints_are_listed_newest_run_and_step_first(tmp_path):
    for run, steps in {"000-DiT-S-8": [5, 10], "002-DiT-S-8": [3], "010-DiT-S-8": [], "011-DiT-B-4": [50]}.items():
        (tmp_path / run / "checkpoints").mkdir(parents=True)
        for step in steps:
            (tmp_path / run / "checkpoints" / f"{step:07d}.pt").write_bytes(b"")
    (tmp_path / "002-DiT-S-8" / "checkpoints" / ".tmp-abc.pt").write_bytes(b"")
    (tmp_path / "002-DiT-S-8" / "checkpoints" / "0000004.pt.bak").write_bytes(b"")
    names = [os.path.relpath(p, tmp_path) for p in checkpoints_newest_first(str(tmp_path), "DiT-S-8")]
    assert names == ["002-DiT-S-8/checkpoints/0000003.pt", "000-DiT-S-8/checkpoints/0000010.pt", "000-DiT-S-8/checkpoints/0000005.pt"]
    assert checkpoints_newest_first(str(tmp_path / "missing"), "DiT-S-8") == []


def test_a_truncated_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    paths = [str(tmp_path / f"{step:07d}.pt") for step in (30, 20, 10)]  # newest first
    for step, path in zip((30, 20, 10), paths):
        save_checkpoint({"step": step}, path)
    data = Path(paths[0]).read_bytes()
    Path(paths[0]).write_bytes(data[: len(data) // 2])
    warnings: list[str] = []
    path, loaded = load_newest_good_checkpoint(paths, warnings.append)
    assert (path, loaded["step"]) == (paths[1], 20)
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert warnings[0].startswith(f"skipping checkpoint {paths[0]}: it does not load (") and warnings[0].endswith("so it can be deleted")


def test_when_no_checkpoint_loads_one_sentence_says_so(tmp_path):
    paths = [str(tmp_path / "0000020.pt"), str(tmp_path / "0000010.pt")]
    for path in paths:
        Path(path).write_bytes(b"garbage")
    warnings: list[str] = []
    with pytest.raises(ValueError, match=r"none of the 2 checkpoints loads \(the newest is .*0000020.pt\); delete them, or use a checkpoint to resume from instead"):
        load_newest_good_checkpoint(paths, warnings.append)
    assert len(warnings) == 2
    assert load_newest_good_checkpoint([], warnings.append) is None


def assert_same_training_state(a: Path, b: Path) -> None:
    ours, reference = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert_state_dicts_equal(ours["model"], reference["model"])
    assert_state_dicts_equal(ours["ema"], reference["ema"])
    for x, y in zip(ours["opt"]["state"].values(), reference["opt"]["state"].values()):
        assert_state_dicts_equal(x, y)
    for x, y in zip(ours["rng"], reference["rng"]):
        assert torch.equal(x["cpu"], y["cpu"])


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_resume_auto_with_no_loadable_checkpoint_is_one_sentence(tmp_path, image_folder, tiny_vae_dir):
    (tmp_path / "000-DiT-S-8" / "checkpoints").mkdir(parents=True)
    (tmp_path / "000-DiT-S-8" / "checkpoints" / "0000002.pt").write_bytes(b"garbage")
    with pytest.raises(SystemExit, match=r"^none of the 1 checkpoints loads \(the newest is .*0000002.pt\); delete them, or pass --resume PATH to a checkpoint to resume from$"):
        train.main(train_args(image_folder, tiny_vae_dir, tmp_path, "--resume", "auto"))


@pytest.mark.slow
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


@pytest.mark.slow
def test_resume_with_another_lr_continues_and_says_so(tmp_path, three_checkpoints, image_folder, tiny_vae_dir):
    results = tmp_path / "results"
    shutil.copytree(three_checkpoints, results)
    train.main(train_args(image_folder, tiny_vae_dir, results, "--resume", "auto", "--max-steps", "7", "--log-every", "1", "--lr", "5e-5"))
    experiment = results / "000-DiT-S-8"
    assert "--lr changed from 0.0001 (the checkpoint's) to 5e-05: continuing with 5e-05" in (experiment / "log.txt").read_text()
    assert read_metrics(experiment)[-1]["lr"] == 5e-5 and read_metrics(experiment)[-1]["step"] == 7


@pytest.mark.slow
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


@pytest.mark.slow
def test_pixel_space_run_resumes_bitwise(tmp_path, image_folder, one_thread):
    def pixel_args(results: Path, *extra: str) -> list[str]:
        args = ["--data-path", str(image_folder), "--results-dir", str(results), *TINY, "--vae", "none", "--log-every", "1"]
        args[args.index("--image-size") + 1] = "32"  # 32x32 pixels: 4x4 tokens of 8x8 patches
        return [*args, *extra]

    train.main(pixel_args(tmp_path / "whole", "--max-steps", "4", "--sample-every", "4", "--sample-steps", "2"))
    whole = tmp_path / "whole" / "000-DiT-S-8"
    reference = torch.load(whole / "checkpoints" / "0000004.pt", weights_only=True)
    assert reference["model"]["x_embedder.proj.weight"].shape == (384, 3, 8, 8) and reference["args"]["vae"] == "none"
    assert Image.open(whole / "samples" / "0000004.png").size == (4 * 32 + 5 * 2, 2 * 32 + 3 * 2)

    train.main(pixel_args(tmp_path / "parts", "--max-steps", "3"))  # stops inside epoch 1
    train.main(pixel_args(tmp_path / "parts", "--max-steps", "4", "--resume", "auto"))
    parts = tmp_path / "parts" / "000-DiT-S-8"
    ours = torch.load(parts / "checkpoints" / "0000004.pt", weights_only=True)
    assert_state_dicts_equal(ours["model"], reference["model"])
    assert_state_dicts_equal(ours["ema"], reference["ema"])
    assert [m["loss"] for m in read_metrics(parts)] == [m["loss"] for m in read_metrics(whole)]


@pytest.mark.slow
def test_a_staged_copy_or_a_link_of_the_images_resumes_and_other_images_are_refused(tmp_path, three_checkpoints, image_folder, tiny_vae_dir):
    saved = torch.load(three_checkpoints / "000-DiT-S-8" / "checkpoints" / "0000006.pt", weights_only=True)
    assert list(saved)[:4] == ["model", "ema", "opt", "args"] and saved["data_fingerprint"].startswith("files-sha256:")
    staged = tmp_path / "scratch" / "job" / "images"
    shutil.copytree(image_folder, staged)  # as `cp -r` to a job's scratch disk
    link = tmp_path / "link"
    os.symlink(image_folder, link)
    resumed = []
    for data_path in (staged, link):
        results = tmp_path / f"results-{data_path.name}"
        shutil.copytree(three_checkpoints, results)
        train.main(train_args(data_path, tiny_vae_dir, results, "--resume", "auto", "--max-steps", "7", "--log-every", "1"))
        experiment = results / "000-DiT-S-8"
        assert f"resuming from {experiment}/checkpoints/0000006.pt at step 6" in (experiment / "log.txt").read_text()
        resumed.append(experiment / "checkpoints" / "0000007.pt")
    assert_same_training_state(*resumed)

    other = make_image_folder(tmp_path / "other_images", seed=1)  # the same file names, other images
    with pytest.raises(SystemExit, match=rf"^cannot resume from .*0000007.pt: it was trained with --data-path {staged} \(now {other}\); resume with the same settings, or pass --accept-changed-data to continue on the data as it is now$"):
        train.main(train_args(other, tiny_vae_dir, tmp_path / "results-images", "--resume", "auto", "--max-steps", "8"))


@pytest.mark.slow
def test_a_checkpoint_without_a_data_fingerprint_compares_the_path(tmp_path, three_checkpoints, image_folder, tiny_vae_dir):
    results = tmp_path / "results"
    shutil.copytree(three_checkpoints, results)
    path = results / "000-DiT-S-8" / "checkpoints" / "0000006.pt"
    older = torch.load(path, weights_only=True)
    del older["data_fingerprint"]
    save_checkpoint(older, str(path))
    staged = tmp_path / "staged"
    shutil.copytree(image_folder, staged)
    with pytest.raises(SystemExit, match=rf"^cannot resume from {path}: it was trained with --data-path {image_folder} \(now {staged}\); resume with the same settings, or pass --accept-changed-data"):
        train.main(train_args(staged, tiny_vae_dir, results, "--resume", "auto", "--max-steps", "7"))
    train.main(train_args(image_folder, tiny_vae_dir, results, "--resume", "auto", "--max-steps", "7"))
    assert (path.parent / "0000007.pt").exists()


@pytest.mark.slow
def test_a_copy_of_a_feature_store_resumes(tmp_path, store32, tiny_vae_dir):
    def args(features: Path) -> list[str]:
        return ["--feature-path", str(features), "--vae-path", str(tiny_vae_dir), "--results-dir", str(tmp_path / "results"),
                *TINY, "--log-every", "1", "--resume", "auto"]

    train.main([*args(store32), "--max-steps", "2"])
    staged = tmp_path / "scratch" / "features"
    shutil.copytree(store32, staged)
    train.main([*args(staged), "--max-steps", "3"])
    experiment = tmp_path / "results" / "000-DiT-S-8"
    assert "resuming from" in (experiment / "log.txt").read_text() and [m["step"] for m in read_metrics(experiment)] == [1, 2, 3]


@pytest.mark.slow
def test_resume_auto_skips_a_checkpoint_damaged_inside_and_redoes_its_step_bitwise(tmp_path, image_folder, tiny_vae_dir):
    """4 KB of one EMA weight overwritten inside the newest checkpoint: torch loads it (its zip
    reader checks no CRC), so only the checksum tells; the run resumes from the one before."""
    from test_checkpoints import nan_over_tensor_bytes

    args = train_args(image_folder, tiny_vae_dir, tmp_path, "--max-steps", "3", "--log-every", "1", "--ckpt-every", "1", "--resume", "auto")
    train.main(args)
    experiment = tmp_path / "000-DiT-S-8"
    newest = experiment / "checkpoints" / "0000003.pt"
    intact = tmp_path / "intact.pt"
    shutil.copy(newest, intact)
    nan_over_tensor_bytes(newest, torch.load(intact, weights_only=True)["ema"]["blocks.0.attn.qkv.weight"])
    assert torch.load(newest, weights_only=True)["ema"]["blocks.0.attn.qkv.weight"].isnan().any()  # what a plain load would take

    train.main(args)
    log = (experiment / "log.txt").read_text()
    assert (
        f"skipping checkpoint {newest}: its content does not match the checksum written with it "
        "(the file changed after it was saved), so it can be deleted"
    ) in log
    assert f"resuming from {experiment}/checkpoints/0000002.pt at step 2" in log
    assert_same_training_state(newest, intact)  # step 3 done again, bit for bit
    assert [m["step"] for m in read_metrics(experiment)] == [1, 2, 3]


def original_format_copy_with_a_nan(source: Path, target: Path, part: str) -> None:
    """`source` saved again as the original train.py writes checkpoints (torch.save, no checksum),
    with one NaN in the EMA weights, or an inf in one of AdamW's step counts (which keeps the
    updates finite, so that the weights stay finite too)."""
    checkpoint = torch.load(source, weights_only=True)
    del checkpoint["checksum"]
    if part == "ema":
        checkpoint["ema"]["final_layer.linear.weight"].view(-1)[0] = float("nan")
    else:
        next(iter(checkpoint["opt"]["state"].values()))["step"].fill_(float("inf"))
    target.parent.mkdir(parents=True)
    torch.save(checkpoint, target)


@pytest.mark.slow
@pytest.mark.parametrize("part,named", [("ema", "the EMA weights"), ("opt", "the optimizer state")])
def test_a_nan_in_the_ema_or_the_optimizer_state_is_never_saved(tmp_path, three_checkpoints, image_folder, tiny_vae_dir, part, named):
    results = tmp_path / "results"
    experiment = results / "000-DiT-S-8"
    original_format_copy_with_a_nan(three_checkpoints / "000-DiT-S-8" / "checkpoints" / "0000006.pt", experiment / "checkpoints" / "0000006.pt", part)
    args = train_args(image_folder, tiny_vae_dir, results, "--resume", "auto", "--max-steps", "8", "--log-every", "1", "--ckpt-every", "1")
    with pytest.raises(SystemExit, match=rf"^{named} became non-finite at step 7; stopping without saving these weights \(last good checkpoint: .*0000006.pt\)$"):
        train.main(args)  # a file without a checksum loads as before; the check before writing catches the NaN
    assert os.listdir(experiment / "checkpoints") == ["0000006.pt"]


PICK_SCRIPT = textwrap.dedent(
    """
    import sys
    import train
    from util import resume
    from util.distributed import cleanup_distributed, setup_distributed

    info = setup_distributed()
    results, empty, data, vae = sys.argv[1:]
    if info.rank == 1:  # this rank's view of the shared folder lags behind: it lists the oldest checkpoint alone
        listing = resume.checkpoints_newest_first
        resume.checkpoints_newest_first = lambda *where: listing(*where)[-1:]
    flags = ["--data-path", data, "--vae-path", vae, "--model", "DiT-S/8", "--image-size", "64", "--num-classes", "3",
             "--global-batch-size", "8", "--resume", "auto"]
    checkpoint, path = resume.open_resume_checkpoint(train.parse_args([*flags, "--results-dir", results]), 24, [], info.is_main)
    with open("/proc/self/maps") as maps:
        mapped = path in maps.read()
    print(f"rank {info.rank}: step {checkpoint['step']} of {path}, memory-mapped {mapped}")
    try:
        resume.open_resume_checkpoint(train.parse_args([*flags, "--results-dir", empty]), 24, [], info.is_main)
    except ValueError as error:
        print(f"rank {info.rank} refused: {error.with_flag('--resume PATH')}")
    cleanup_distributed()
    """
)


@pytest.mark.slow
def test_rank_0_picks_the_resume_checkpoint_and_every_rank_maps_that_file(tmp_path, three_checkpoints, image_folder, tiny_vae_dir):
    script = tmp_path / "pick.py"
    script.write_text(PICK_SCRIPT)
    broken = tmp_path / "broken" / "000-DiT-S-8" / "checkpoints"
    broken.mkdir(parents=True)
    (broken / "0000002.pt").write_bytes(b"garbage")
    result = run_script([str(script), str(three_checkpoints), str(tmp_path / "broken"), str(image_folder), str(tiny_vae_dir)], nproc=2)
    newest = three_checkpoints / "000-DiT-S-8" / "checkpoints" / "0000006.pt"
    refusal = (
        f"refused: none of the 1 checkpoints loads (the newest is {broken / '0000002.pt'}); "
        "delete them, or pass --resume PATH to a checkpoint to resume from"
    )
    for rank in (0, 1):
        assert f"rank {rank}: step 6 of {newest}, memory-mapped True" in result.stdout
        assert f"rank {rank} {refusal}" in result.stdout


@pytest.mark.slow
def test_after_a_rewind_resume_auto_continues_the_rewound_branch(tmp_path, three_checkpoints, image_folder, tiny_vae_dir):
    results = tmp_path / "results"
    shutil.copytree(three_checkpoints, results)
    experiment = results / "000-DiT-S-8"
    folder = experiment / "checkpoints"
    abandoned = {name: (folder / name).read_bytes() for name in ("0000004.pt", "0000006.pt")}
    args = train_args(image_folder, tiny_vae_dir, results, "--log-every", "1", "--lr", "5e-5")
    train.main([*args, "--resume", str(folder / "0000002.pt"), "--max-steps", "3"])  # rewound by hand, then stopped
    train.main([*args, "--resume", "auto", "--max-steps", "4"])  # the requeued job

    (aside,) = [entry for entry in os.listdir(folder) if entry.startswith("set-aside-after-0000002-")]
    assert sorted(os.listdir(folder)) == ["0000002.pt", "0000003.pt", "0000004.pt", aside]
    assert {name: (folder / aside / name).read_bytes() for name in os.listdir(folder / aside)} == abandoned
    log = (experiment / "log.txt").read_text()
    assert f"set aside 2 newer checkpoint(s) (0000004.pt, 0000006.pt) in {folder / aside}, so that this run continues from step 2" in log
    assert f"resuming from {folder}/0000003.pt at step 3" in log
    assert torch.load(folder / "0000004.pt", weights_only=True)["args"]["lr"] == 5e-5  # the new branch, not the old step 4
    assert [(m["step"], m["lr"]) for m in read_metrics(experiment)] == [(1, 1e-4), (2, 1e-4), (3, 5e-5), (4, 5e-5)]


@pytest.mark.slow
def test_a_temporary_left_in_a_run_without_checkpoints_is_removed_unless_a_job_holds_the_run(tmp_path, image_folder, tiny_vae_dir):
    from util.run_lock import RunLock

    temporaries = []
    for run in ("000-DiT-S-8", "001-DiT-S-8"):  # killed during their first checkpoint
        (tmp_path / run / "checkpoints").mkdir(parents=True)
        temporaries.append(tmp_path / run / "checkpoints" / ".tmp-k1ll3d.pt")
        temporaries[-1].write_bytes(b"x" * 1000)
    with RunLock(str(tmp_path / "001-DiT-S-8")):  # 001 is a live job writing its first checkpoint
        train.main(train_args(image_folder, tiny_vae_dir, tmp_path, "--max-steps", "1", "--resume", "auto"))
    assert not temporaries[0].exists() and temporaries[1].exists()
    log = (tmp_path / "002-DiT-S-8" / "log.txt").read_text()
    assert f"removed 1 temporary checkpoint file(s) left by a killed run: {temporaries[0]}" in log
