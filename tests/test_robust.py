"""Long runs lose nothing: run folders claimed atomically, checkpoint writes on a full or
read-only disk, stale temporaries, damaged checkpoints, metrics written twice, stop signals."""
from __future__ import annotations

import errno
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from util import checkpoints as checkpoint
from util.files import WriteError, append_record, create_run_dir, output_folder_problem, trim_metrics
from util.checkpoints import load_checkpoint, remove_stale_temporaries, save_checkpoint
from util.resume import checkpoints_newest_first, load_newest_good_checkpoint
from conftest import REPO, make_read_only, tmpfs
from util.stop_signals import StopRequest, exit_code

# ----------------------------------------------------------------------------------------
# Small real file systems: a full disk and a read-only one (tmpfs; needs root)
# ----------------------------------------------------------------------------------------






# ----------------------------------------------------------------------------------------
# Run folders
# ----------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------
# Checkpoint writes: mode, full disk, read-only folder
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_checkpoints_are_group_readable_as_the_umask_allows(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        save_checkpoint({"w": torch.zeros(2)}, str(tmp_path / "c.pt"))
    finally:
        os.umask(previous)
    assert (tmp_path / "c.pt").stat().st_mode & 0o777 == mode


def failing_save(error: BaseException):
    def save(obj, f) -> None:
        f.write(b"x" * 1000)  # part of a checkpoint, as a real failure leaves
        raise error

    return save


@pytest.mark.parametrize(
    "error,message",
    [
        (OSError(errno.ENOSPC, "No space left on device"), r"the disk is full \(No space left on device\); free some space"),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), r"the disk is full \(Disk quota exceeded\)"),
        (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"), r"the disk is full \(torch.save could not write all bytes\)"),
        (OSError(errno.EROFS, "Read-only file system"), r"the folder is read-only or not writable \(Read-only file system\)"),
        (OSError(errno.EACCES, "Permission denied"), r"the folder is read-only or not writable \(Permission denied\)"),
    ],
)
def test_write_errors_are_one_sentence_and_lose_nothing(tmp_path, monkeypatch, error, message):
    earlier = tmp_path / "0000001.pt"
    save_checkpoint({"w": torch.ones(3)}, str(earlier))
    path = tmp_path / "0000002.pt"
    monkeypatch.setattr(checkpoint.torch, "save", failing_save(error))
    with pytest.raises(WriteError, match=rf"^cannot write checkpoint {path}: {message}"):
        save_checkpoint({"w": torch.zeros(3)}, str(path))
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["0000001.pt"]  # the temporary is gone, the earlier file kept
    assert torch.equal(load_checkpoint(str(earlier))["w"], torch.ones(3))


@pytest.mark.parametrize(
    "code, kind",
    [(errno.ENOSPC, "full"), (errno.EDQUOT, "full"), (errno.EROFS, "read-only"), (errno.EACCES, "read-only"), (errno.EPERM, "read-only")],
)
def test_write_errors_are_told_apart_by_errno_whatever_the_text(code, kind):
    """The errno decides, not the OS's wording (which varies with the locale and the platform)."""
    from util.files import write_error_message

    message = write_error_message(OSError(code, "some localised text"), "f.pt")
    assert message is not None and (("the disk is full" in message) == (kind == "full"))
    assert write_error_message(OSError(errno.ENOENT, "No space left on device"), "f.pt") is None
    # torch.save's errno-less RuntimeError is the one case told by its text.
    assert "the disk is full" in write_error_message(RuntimeError("PytorchStreamWriter failed: file write failed"), "f.pt")


def test_other_errors_are_not_disguised(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint.torch, "save", failing_save(RuntimeError("something else")))
    with pytest.raises(RuntimeError, match="^something else$"):
        save_checkpoint({"w": torch.zeros(3)}, str(tmp_path / "c.pt"))
    assert os.listdir(tmp_path) == []


def test_a_really_full_disk(tmp_path):
    with tmpfs(tmp_path / "fs", "256k") as fs:
        save_checkpoint({"w": torch.ones(1000)}, str(fs / "0000001.pt"))
        with pytest.raises(WriteError, match=r"cannot write checkpoint .*0000002.pt: the disk is full"):
            save_checkpoint({"w": torch.zeros(100_000)}, str(fs / "0000002.pt"))  # 400 KB
        assert os.listdir(fs) == ["0000001.pt"]
        assert torch.equal(load_checkpoint(str(fs / "0000001.pt"))["w"], torch.ones(1000))


def test_a_really_read_only_folder(tmp_path):
    with tmpfs(tmp_path / "fs", "1m") as fs:
        save_checkpoint({"w": torch.ones(10)}, str(fs / "0000001.pt"))
        make_read_only(fs)
        with pytest.raises(WriteError, match=r"cannot write checkpoint .*0000002.pt: the folder is read-only or not writable"):
            save_checkpoint({"w": torch.zeros(10)}, str(fs / "0000002.pt"))
        assert os.listdir(fs) == ["0000001.pt"]
        assert torch.equal(load_checkpoint(str(fs / "0000001.pt"))["w"], torch.ones(10))


# ----------------------------------------------------------------------------------------
# Recovery at resume: stale temporaries, damaged checkpoints, metrics written twice
# ----------------------------------------------------------------------------------------


def test_stale_temporaries_are_removed(tmp_path):
    save_checkpoint({"w": torch.zeros(2)}, str(tmp_path / "0000005.pt"))
    for name in (".tmp-abc123.pt", ".tmp-x.pt"):
        (tmp_path / name).write_bytes(b"half a checkpoint")
    (tmp_path / ".tmp-notes.txt").write_text("not ours")
    removed = remove_stale_temporaries(str(tmp_path))
    assert [os.path.basename(p) for p in removed] == [".tmp-abc123.pt", ".tmp-x.pt"]
    assert sorted(os.listdir(tmp_path)) == [".tmp-notes.txt", "0000005.pt"]
    assert remove_stale_temporaries(str(tmp_path / "missing")) == []


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


# ----------------------------------------------------------------------------------------
# Stop signals and the collective that makes ranks agree
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGUSR1, 138)])
def test_stop_signals_set_a_flag_instead_of_killing(sig, code):
    before = signal.getsignal(sig)
    with StopRequest() as stop:
        assert stop.received is None and stop.signal_number == 0
        os.kill(os.getpid(), sig)
        assert stop.received == sig and exit_code(stop.signal_number) == code
    assert signal.getsignal(sig) is before


ANY_RANK_SCRIPT = textwrap.dedent(
    """
    import sys
    from util.distributed import any_rank, cleanup_distributed, max_over_ranks, setup_distributed

    info = setup_distributed()
    results = [any_rank(False), any_rank(info.rank == 1), any_rank(info.rank == 0), any_rank(True)]
    print(f"rank {info.rank}: {results} {max_over_ranks(10 * info.rank)} {max_over_ranks(15 - 5 * info.rank)}")
    cleanup_distributed()
    """
)


def test_any_rank_and_max_over_ranks_agree_over_two_gloo_processes(tmp_path):
    script = tmp_path / "any_rank_check.py"
    script.write_text(ANY_RANK_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank}: [False, True, True, True] 10 15" in result.stdout
