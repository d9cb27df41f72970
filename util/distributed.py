"""Process-group set-up, device choice and rank-aware logging shared by the scripts.

Every script runs both under `torchrun` (one process per GPU, or gloo processes on a
CPU) and as plain `python script.py` (one process, no process group).
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from util.files import first_line, write_error_message


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def default_device() -> torch.device:
    """The GPU when there is one, else the CPU (single-process runs)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def setup_distributed() -> DistInfo:
    """Join the torchrun process group (nccl on GPUs, gloo on CPUs) or run as one process."""
    use_cuda = torch.cuda.is_available()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo(rank=0, local_rank=0, world_size=1, device=default_device())
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return DistInfo(rank=dist.get_rank(), local_rank=local_rank, world_size=dist.get_world_size(), device=device)


def cleanup_distributed() -> None:
    global _cpu_group
    if dist.is_initialized():
        dist.destroy_process_group()  # destroys any_rank's gloo group too
    _cpu_group = None


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Average a tensor over all processes (in place; the identity in a single process)."""
    if dist.is_initialized():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x /= dist.get_world_size()
    return x


def all_gather_objects(obj: object) -> list:
    """Every process's picklable `obj`, in rank order ([obj] in a single process)."""
    if not dist.is_initialized():
        return [obj]
    objects: list = [None] * dist.get_world_size()
    dist.all_gather_object(objects, obj)
    return objects


def gather_from_all(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate a same-shaped tensor from every process (the tensor itself in one process)."""
    if not dist.is_initialized():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor)
    return torch.cat(parts)


def rng_states_of_all_ranks(device: torch.device) -> list[dict]:
    """Every process's torch RNG states (CPU, and CUDA on a GPU), in rank order."""
    return all_gather_objects(
        {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
    )


class LogFile(logging.FileHandler):
    """log.txt. A write that fails (a full disk, a deleted folder) is said once, in one sentence on
    stderr, and the log goes on in the terminal alone, instead of a traceback for every line."""

    failure: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.failure is None:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        error = sys.exc_info()[1]
        if self.failure is not None or error is None:
            return
        self.failure = write_error_message(error, self.baseFilename, "append to") or (
            f"cannot append to {self.baseFilename}: {first_line(error)}"
        )
        print(f"{self.failure}; the log goes on in the terminal only", file=sys.stderr, flush=True)

    def close(self) -> None:
        try:
            super().close()
        except OSError:  # the buffered rest of a log that could not be written either
            pass


def create_logger(log_dir: str | None, rank: int) -> logging.Logger:
    """Rank 0 logs to stdout and, when log_dir is given, to log_dir/log.txt; other ranks are silent."""
    logger = logging.getLogger("dit")
    for handler in logger.handlers:
        handler.close()  # a log.txt of an earlier run in this process
    logger.handlers.clear()
    logger.propagate = False
    if rank != 0:
        logger.addHandler(logging.NullHandler())
        return logger
    logger.setLevel(logging.INFO)
    formatter = logging.Formatter("[\033[34m%(asctime)s\033[0m] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if log_dir is not None:
        handlers.append(LogFile(os.path.join(log_dir, "log.txt")))
    for handler in handlers:
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    return logger


_cpu_group: dist.ProcessGroup | None = None


def max_over_ranks(value: int) -> int:
    """The largest of every process's `value`: a collective, so every rank calls it at the same point.

    It runs on the CPU (a gloo group beside nccl on GPUs), so calling it every step costs no
    wait for the device.
    """
    global _cpu_group
    if not dist.is_initialized():
        return value
    if _cpu_group is None:
        _cpu_group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    tensor = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=_cpu_group)
    return int(tensor.item())


def any_rank(flag: bool) -> bool:
    """Whether `flag` is true on any process (a collective, like max_over_ranks)."""
    return max_over_ranks(int(flag)) > 0
