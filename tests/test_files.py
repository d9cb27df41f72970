"""util/files.py: run folders claimed atomically, output folders that cannot work refused in one
sentence, records appended to a full disk or a deleted folder, metrics that keep one record per
step at a resume, atomic files that two writers can write at once."""
from __future__ import annotations

import json
import multiprocessing
import os

import pytest

from conftest import make_read_only, tmpfs
from util.files import WriteError, append_record, atomic_open, create_run_dir, current_umask, output_folder_problem, trim_metrics


def test_run_numbers_are_never_reused(tmp_path):
    first = create_run_dir(str(tmp_path), "DiT-S-8")
    second = create_run_dir(str(tmp_path), "DiT-B-4")
    assert (os.path.basename(first), os.path.basename(second)) == ("000-DiT-S-8", "001-DiT-B-4")
    os.rmdir(first)  # a deleted run does not free the number of a later one
    (tmp_path / "notes.txt").write_text("not a run")
    assert os.path.basename(create_run_dir(str(tmp_path), "DiT-S-8")) == "002-DiT-S-8"
    assert sorted(os.listdir(tmp_path)) == ["001-DiT-B-4", "002-DiT-S-8", "notes.txt"]


def claim_after_barrier(results_dir: str, barrier, queue) -> None:
    barrier.wait()
    queue.put(create_run_dir(results_dir, "DiT-S-8"))


def test_processes_started_together_get_distinct_folders(tmp_path):
    context = multiprocessing.get_context("fork")
    processes, rounds = 6, 3
    claimed = []
    for _ in range(rounds):  # like job arrays that start at the same moment
        barrier, queue = context.Barrier(processes), context.Queue()
        workers = [context.Process(target=claim_after_barrier, args=(str(tmp_path), barrier, queue)) for _ in range(processes)]
        for worker in workers:
            worker.start()
        claimed += [queue.get(timeout=60) for _ in workers]
        for worker in workers:
            worker.join(timeout=60)
            assert worker.exitcode == 0
    assert len(set(claimed)) == processes * rounds
    assert sorted(os.listdir(tmp_path)) == [f"{n:03d}-DiT-S-8" for n in range(processes * rounds)]


def test_run_folder_in_a_read_only_results_dir_is_one_sentence(tmp_path):
    with tmpfs(tmp_path / "fs", "1m") as fs:
        make_read_only(fs)
        with pytest.raises(WriteError, match=r"^cannot create a run folder in .*fs/results: the folder is read-only or not writable \(.+\)$"):
            create_run_dir(str(fs / "results"), "DiT-S-8")


def test_output_folders_that_cannot_work_are_one_sentence(tmp_path):
    (tmp_path / "a_file").write_text("")
    assert output_folder_problem(str(tmp_path / "a_file"), "--results-dir") == f"--results-dir {tmp_path}/a_file is a file, not a folder"
    assert output_folder_problem(str(tmp_path / "a_file" / "x"), "--results-dir") == (
        f"--results-dir {tmp_path}/a_file/x cannot be made: {tmp_path}/a_file is a file, not a folder"
    )
    assert output_folder_problem(str(tmp_path / "new" / "deeper"), "--results-dir") is None
    with tmpfs(tmp_path / "fs", "1m") as fs:
        make_read_only(fs)
        assert output_folder_problem(str(fs / "results"), "--results-dir") == (
            f"--results-dir {fs}/results is not writable ({fs} is read-only or lacks write permission)"
        )


def test_appending_a_record_to_a_full_disk_is_one_sentence(tmp_path):
    with tmpfs(tmp_path / "fs", "64k") as fs:
        path = fs / "metrics.jsonl"
        append_record(str(path), {"step": 1, "loss": 0.5})
        try:  # fill the disk up
            with open(fs / "filler", "wb") as f:
                while True:
                    f.write(b"\0" * 4096)
                    f.flush()
        except OSError:
            pass
        with pytest.raises(WriteError, match=rf"^cannot append to {path}: the disk is full \(No space left on device\); free some space and run again$"):
            append_record(str(path), {"step": 2, "loss": 0.5, "padding": "x" * 8192})
        assert json.loads(path.read_text().splitlines()[0]) == {"step": 1, "loss": 0.5}


def test_metrics_keep_one_record_per_step_up_to_the_resumed_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3, 3, 4, 5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 6, "lo')  # cut off by a kill
    assert trim_metrics(str(path), last_step=4) == 3  # the second 3, 5 and the cut line
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]
    assert path.read_text().endswith("\n")
    before = path.read_text()
    assert trim_metrics(str(path), last_step=4) == 0 and path.read_text() == before
    assert trim_metrics(str(tmp_path / "missing.jsonl"), last_step=4) == 0


def test_two_writers_of_one_atomic_file_do_not_share_a_temporary(tmp_path):
    path = tmp_path / "settings.json"
    with atomic_open(str(path)) as first, atomic_open(str(path)) as second:
        first.write("first writer\n" * 1000)
        second.write("second\n")
    assert path.read_text() == "first writer\n" * 1000  # the last one renamed wins, whole
    assert os.listdir(tmp_path) == ["settings.json"]  # no temporary left
    assert path.stat().st_mode & 0o777 == 0o666 & ~current_umask()


def test_a_record_for_a_deleted_folder_is_one_sentence(tmp_path):
    folder = tmp_path / "000-DiT-S-8"
    with pytest.raises(WriteError) as error:
        append_record(str(folder / "metrics.jsonl"), {"step": 1})
    assert str(error.value) == f"cannot append to {folder}/metrics.jsonl: the folder {folder} no longer exists (moved or deleted while this ran)"
