"""util/run_lock.py: one job per run folder; a live holder is named in one sentence, a crashed
one's lock is taken over (at once on this host, after the timeout from another host)."""
from __future__ import annotations

import errno
import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest

from util import run_lock
from util.run_lock import RunLock, RunLockedError, try_lock


def write_lock(folder, host: str, pid: int, age_seconds: float = 0.0) -> None:
    path = folder / "lock"
    path.write_text(json.dumps({"host": host, "pid": pid, "since": "2025-01-01T00:00:00"}))
    stamp = time.time() - age_seconds
    os.utime(path, (stamp, stamp))


def finished_pid() -> int:
    """The pid of a process that has exited (a crashed job's)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_second_holder_is_refused_in_one_sentence_naming_the_first(tmp_path):
    with RunLock(str(tmp_path)) as first:
        holder = json.loads((tmp_path / "lock").read_text())
        assert holder == first.holder and holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(RunLockedError) as refused:
            RunLock(str(tmp_path)).acquire()
        assert str(refused.value) == (
            f"{tmp_path} is in use by another job (process {os.getpid()} on host {socket.gethostname()}, since {holder['since']}); "
            f"wait for that job to end or stop it (its lock {tmp_path}/lock is taken over once the job is gone: at once on "
            "the same host, after 15 minutes without a heartbeat from another host)"
        )
        assert try_lock(str(tmp_path)) is None
    assert os.listdir(tmp_path) == []  # released, and no temporary left


def test_the_lock_of_a_crashed_job_on_this_host_is_taken_over_at_once(tmp_path):
    write_lock(tmp_path, socket.gethostname(), finished_pid())
    with RunLock(str(tmp_path)):
        assert json.loads((tmp_path / "lock").read_text())["pid"] == os.getpid()


def test_a_lock_from_another_host_holds_until_its_heartbeat_is_older_than_the_timeout(tmp_path):
    write_lock(tmp_path, "node-17", 4242, age_seconds=run_lock.STALE_AFTER_SECONDS - 60)
    with pytest.raises(RunLockedError, match=re.escape("(process 4242 on host node-17, since 2025-01-01T00:00:00)")):
        RunLock(str(tmp_path)).acquire()
    write_lock(tmp_path, "node-17", 4242, age_seconds=run_lock.STALE_AFTER_SECONDS + 60)
    with RunLock(str(tmp_path)):
        assert json.loads((tmp_path / "lock").read_text())["host"] == socket.gethostname()


def test_the_holder_keeps_its_lock_fresh_and_removes_only_its_own(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "HEARTBEAT_SECONDS", 0.05)
    lock = RunLock(str(tmp_path)).acquire()
    old = time.time() - 3600
    os.utime(tmp_path / "lock", (old, old))
    time.sleep(0.5)
    assert time.time() - os.stat(tmp_path / "lock").st_mtime < 60
    write_lock(tmp_path, "node-17", 4242)  # another job took it over meanwhile
    lock.release()
    assert json.loads((tmp_path / "lock").read_text())["host"] == "node-17"


def test_a_reused_pid_or_another_pid_namespace_holds_only_until_the_timeout(tmp_path):
    """A live pid on this host in another container, or a crashed job's pid reused by another
    process: the lock holds while fresh and is taken over once its heartbeat is older than the timeout."""
    path = tmp_path / "lock"
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": finished_pid(), "pid_namespace": "pid:[1]", "since": "x"}))
    assert not run_lock.is_stale(str(path), json.loads(path.read_text()))  # another namespace: its pids cannot be seen from here
    write_lock(tmp_path, socket.gethostname(), os.getppid())  # a live process of this namespace
    assert not run_lock.is_stale(str(path), json.loads(path.read_text()))
    write_lock(tmp_path, socket.gethostname(), os.getppid(), age_seconds=run_lock.STALE_AFTER_SECONDS + 60)
    assert run_lock.is_stale(str(path), json.loads(path.read_text()))


def test_without_hard_links_the_lock_is_an_exclusive_create(tmp_path, monkeypatch):
    def no_links(source, target):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(run_lock.os, "link", no_links)
    with RunLock(str(tmp_path)) as first:
        assert json.loads((tmp_path / "lock").read_text()) == first.holder
        with pytest.raises(RunLockedError):
            RunLock(str(tmp_path)).acquire()
    assert os.listdir(tmp_path) == []
