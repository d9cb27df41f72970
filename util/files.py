"""Files that appear whole or not at all, one-sentence errors for full and read-only disks,
run folders claimed atomically, and the metrics.jsonl record log."""
from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from contextlib import contextmanager
from typing import IO, Iterator

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
NOT_WRITABLE_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)
# The text of the errno-less RuntimeError torch.save raises when the disk fills up under it
# (its writer checks the bytes written); the only errors recognised by text.
TORCH_SHORT_WRITE_MARKERS = ("unexpected pos", "file write failed")
RUN_NUMBER = re.compile(r"^(\d+)-")


class WriteError(OSError):
    """A write that failed for a full or read-only disk or a folder deleted under it, with a
    one-sentence message."""

    def __str__(self) -> str:
        return self.strerror  # the sentence alone, without the "[Errno 28]" prefix


def write_error_message(error: BaseException, path: str, action: str = "write") -> str | None:
    """One sentence for a disk-full, not-writable or folder-gone error of `action` on `path`; None
    for any other error.

    The OS's errno decides wherever there is one; torch.save's own writer is the exception."""
    code = error.errno if isinstance(error, OSError) else None
    if code in DISK_FULL_ERRNOS:
        return f"cannot {action} {path}: the disk is full ({error.strerror}); free some space and run again"
    if code in NOT_WRITABLE_ERRNOS:
        return f"cannot {action} {path}: the folder is read-only or not writable ({error.strerror})"
    folder = os.path.dirname(os.path.abspath(path))
    if code == errno.ENOENT and not os.path.isdir(folder):
        return f"cannot {action} {path}: the folder {folder} no longer exists (moved or deleted while this ran)"
    # Fallback for torch.save alone: its C++ writer reports a short write as a RuntimeError that
    # carries no errno, only this text.
    if isinstance(error, RuntimeError) and any(marker in str(error) for marker in TORCH_SHORT_WRITE_MARKERS):
        return f"cannot {action} {path}: the disk is full (torch.save could not write all bytes); free some space and run again"
    return None


@contextmanager
def one_sentence_write_errors(path: str, action: str) -> Iterator[None]:
    """Turn a disk-full, not-writable or folder-gone error raised inside into a WriteError with one sentence
    about `action` on `path`; any other error passes unchanged."""
    try:
        yield
    except (OSError, RuntimeError) as error:
        message = write_error_message(error, path, action)
        if message is None:
            raise
        raise WriteError(error.errno if isinstance(error, OSError) else errno.ENOSPC, message) from error


def current_umask() -> int:
    """The process's umask (os.umask only reads it by setting it, so it is set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_open(path: str, mode: str = "w", temp_prefix: str | None = None, temp_suffix: str = ".tmp") -> Iterator[IO]:
    """A file that appears at `path` whole or not at all: written to a temporary file of its own
    beside `path` (two writers never share one; named temp_prefix + random + temp_suffix, by
    default .<name>.<random>.tmp), renamed over `path` when the block ends, removed when it fails
    (a killed run leaves no half-written file). It gets the mode a plain open() would give."""
    folder, name = os.path.split(os.path.abspath(path))
    fd, tmp_path = tempfile.mkstemp(prefix=temp_prefix or f".{name}.", suffix=temp_suffix, dir=folder)
    try:
        with os.fdopen(fd, mode) as f:
            os.fchmod(f.fileno(), 0o666 & ~current_umask())  # mkstemp creates files as 0600
            yield f
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def create_run_dir(results_dir: str, name: str) -> str:
    """Claim results_dir/NNN-<name> with a new number, one past the highest in use.

    The folder is made with an exclusive mkdir, so a folder is never reused, even by jobs that
    start at the same moment: whoever loses the race moves on to the next number.
    """
    with one_sentence_write_errors(results_dir, "create a run folder in"):
        os.makedirs(results_dir, exist_ok=True)
        numbers = [int(match.group(1)) for entry in os.listdir(results_dir) if (match := RUN_NUMBER.match(entry))]
        number = max(numbers, default=-1) + 1
        while True:
            run_dir = os.path.join(results_dir, f"{number:03d}-{name}")
            try:
                os.mkdir(run_dir)
                return run_dir
            except FileExistsError:
                number += 1


def nearest_existing(path: str) -> str:
    """`path` made absolute, or its nearest ancestor that exists (the folder a new one would go in)."""
    folder = os.path.abspath(path)
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    return folder


def output_folder_problem(path: str, flag: str) -> str | None:
    """One sentence when `path` cannot become or hold an output folder (a file is in the way, or
    the folder or its nearest existing parent is read-only); None when it can."""
    if os.path.exists(path) and not os.path.isdir(path):
        return f"{flag} {path} is a file, not a folder"
    folder = nearest_existing(path)
    if not os.path.isdir(folder):
        return f"{flag} {path} cannot be made: {folder} is a file, not a folder"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"{flag} {path} is not writable ({folder} is read-only or lacks write permission)"
    return None


def append_record(path: str, record: dict) -> None:
    """Append `record` to `path` (metrics.jsonl) as one JSON line; a full or read-only disk raises WriteError."""
    with one_sentence_write_errors(path, "append to"), open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def trim_metrics(path: str, last_step: int) -> int:
    """Make `path` (metrics.jsonl) hold one record per step, up to `last_step` only.

    A resumed run logs again every step after its checkpoint, and a kill can cut the last line;
    those records are dropped (the file is rewritten atomically). Returns how many were dropped.
    """
    if not os.path.isfile(path):
        return 0
    with open(path) as f:
        lines = f.read().splitlines()
    kept, seen = [], set()
    for line in lines:
        try:
            step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):  # a line cut off mid-write
            continue
        if isinstance(step, int) and step <= last_step and step not in seen:
            kept.append(line)
            seen.add(step)
    if len(kept) < len(lines):
        with atomic_open(path) as f:
            f.write("".join(line + "\n" for line in kept))
    return len(lines) - len(kept)
