"""Resuming on another number of processes or another accumulation split, with the same global
batch: the run continues at the same step and at the same place of the epoch's data order.

(Resuming on the same number of processes is bitwise exact: test_train.py.)
"""
from __future__ import annotations

import torch

from util import data
import train
from util.resume import seed_for_step
from conftest import read_metrics, run_script, train_args


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
