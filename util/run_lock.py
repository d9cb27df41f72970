"""One job per run folder: a lock file held by the first process of the job that trains in it.

The lock is `<run folder>/lock`, a small JSON file naming its holder (host, pid, when it was
taken), published whole with a hard link, which fails if the name exists: of two jobs that
start together exactly one gets it. The holder touches the file every HEARTBEAT_SECONDS from
a daemon thread and removes it when it exits, after an error or a stop signal as after a
finished run. A lock left by a crash is taken over:

  - on the same host and in the same pid namespace, as soon as its pid is not running;
  - from another host or container (whose processes cannot be seen), and whenever the pid was
    reused by another process, once the file has gone STALE_AFTER_SECONDS without a heartbeat.
    That is 15 heartbeats: a holder that is alive but slowed down (a loaded file server, a
    paused VM) is not robbed of its lock, and clocks that disagree by minutes between hosts do
    not matter.

File systems without hard links (some FUSE and SMB mounts) get the lock by an exclusive create.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import tempfile
import threading
import time
from datetime import datetime

from util.files import one_sentence_write_errors

LOCK_NAME = "lock"
HEARTBEAT_SECONDS = 60.0
STALE_AFTER_SECONDS = 15 * 60.0
# What os.link raises on a file system without hard links.
NO_HARD_LINKS = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS)


class RunLockedError(RuntimeError):
    """The run folder is held by another live job; the message names it in one sentence."""


def process_is_running(pid: int) -> bool:
    """Whether a process with this pid exists on this host (signal 0 checks without sending)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def pid_namespace() -> str | None:
    """This process's pid namespace ("pid:[4026531836]" on Linux): pids are comparable only within one."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def read_holder(path: str) -> dict | None:
    """The holder a lock file names, or None when there is no lock file."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(text)
    except ValueError:  # cannot happen to a linked lock; a file someone else wrote
        holder = {}
    return holder if isinstance(holder, dict) else {}


def is_stale(path: str, holder: dict) -> bool:
    """Whether the job that took this lock is gone (see the module's docstring)."""
    try:
        if time.time() - os.stat(path).st_mtime > STALE_AFTER_SECONDS:
            return True
    except FileNotFoundError:
        return True
    same_pids = holder.get("host") == socket.gethostname() and holder.get("pid_namespace", pid_namespace()) == pid_namespace()
    return same_pids and isinstance(holder.get("pid"), int) and not process_is_running(holder["pid"])


def describe(holder: dict) -> str:
    return f"process {holder.get('pid', '?')} on host {holder.get('host', '?')}, since {holder.get('since', '?')}"


class RunLock:
    """The lock of one run folder, held from `acquire` to `release` (a context manager too)."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, LOCK_NAME)
        self.holder = {
            "host": socket.gethostname(), "pid": os.getpid(), "pid_namespace": pid_namespace(),
            "since": datetime.now().isoformat(timespec="seconds"),
        }
        self.stopped = threading.Event()
        self.heartbeat: threading.Thread | None = None

    def acquire(self) -> "RunLock":
        """Take the lock, taking over a stale one; RunLockedError names a live holder. A full or
        read-only disk raises WriteError."""
        with one_sentence_write_errors(self.path, "write the lock file"):
            while not self.publish():
                holder = read_holder(self.path)
                if holder is None:
                    continue  # released meanwhile: try again
                if not is_stale(self.path, holder):
                    raise RunLockedError(
                        f"{os.path.dirname(self.path)} is in use by another job ({describe(holder)}); wait for that job "
                        f"to end or stop it (its lock {self.path} is taken over once the job is gone: at once on the same "
                        f"host, after {STALE_AFTER_SECONDS / 60:.0f} minutes without a heartbeat from another host)"
                    )
                if read_holder(self.path) == holder:  # still the same stale holder, not a new job's lock
                    os.remove(self.path)
        self.heartbeat = threading.Thread(target=self.beat, name="run-lock-heartbeat", daemon=True)
        self.heartbeat.start()
        return self

    def publish(self) -> bool:
        """Write the holder to a temporary file and link it to the lock's name: False if one exists."""
        folder = os.path.dirname(self.path)
        fd, tmp_path = tempfile.mkstemp(prefix=".lock-", dir=folder)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.holder, f)
            os.link(tmp_path, self.path)
            return True
        except FileExistsError:
            return False
        except OSError as error:
            if error.errno not in NO_HARD_LINKS:
                raise
            return self.publish_by_exclusive_create()
        finally:
            os.remove(tmp_path)

    def publish_by_exclusive_create(self) -> bool:
        """The lock made with O_CREAT | O_EXCL where hard links are not supported: False if one exists."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self.holder, f)
        return True

    def beat(self) -> None:
        """Touch the lock file until released (a folder deleted under the run ends the heartbeat)."""
        while not self.stopped.wait(HEARTBEAT_SECONDS):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file if it is still this job's."""
        self.stopped.set()
        if self.heartbeat is not None:
            self.heartbeat.join()
            self.heartbeat = None
        if read_holder(self.path) == self.holder:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def try_lock(run_dir: str) -> RunLock | None:
    """The lock of `run_dir` if no live job holds it, else None (for brief tidying of other runs)."""
    try:
        return RunLock(run_dir).acquire()
    except (RunLockedError, OSError):
        return None
