"""util/distributed.py: any_rank and max_over_ranks give every rank the same answer over two gloo
processes; a log.txt on a disk that fills up is one sentence, not a traceback for every line."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO, tmpfs
from util.distributed import create_logger

pytestmark = pytest.mark.slow  # two processes under torchrun


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


def test_a_log_file_on_a_full_disk_is_one_sentence(tmp_path, capsys):
    with tmpfs(tmp_path / "fs", "64k") as fs:
        logger = create_logger(str(fs), rank=0)
        logger.info("the first line fits")
        with open(fs / "filler", "wb", buffering=0) as f, pytest.raises(OSError):
            while True:
                f.write(b"x" * 4096)
        for step in range(100):
            logger.info(f"(step={step:07d}) train loss: 1.0000 " + "x" * 100)
        create_logger(None, rank=0)  # closes log.txt
        err = capsys.readouterr().err
    assert "Logging error" not in err and "Traceback" not in err
    assert err.count(f"cannot append to {fs}/log.txt: the disk is full (No space left on device); free some space and run again; the log goes on in the terminal only") == 1
    assert err.count("train loss") == 100  # the terminal has every line
