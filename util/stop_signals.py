"""Stop requests from a scheduler or a terminal, turned into a clean stop at a step boundary.

SIGTERM is what preemption and `scancel` send (SLURM sends SIGKILL after KillWait, 30 s by
default); SIGUSR1 is what `sbatch --signal=USR1@120` sends ahead of the time limit; SIGINT is
Ctrl-C and SIGHUP a closed terminal or ssh session. While a `StopRequest` is active these
signals only set a flag; the training loop checks it after each step (agreeing over ranks with
`distributed.max_over_ranks`), saves a checkpoint and exits. A second SIGINT (Ctrl-C pressed
again while the step or the checkpoint is still running) exits at once, without saving; one
that comes within REPEAT_SECONDS of the first is the same Ctrl-C relayed (a terminal signals
torchrun and its workers, then torchrun signals the workers again) and changes nothing.

torchrun forwards the signal it gets (SIGTERM, SIGINT, SIGHUP) to its workers and waits
--shutdown-timeout, 30 s, before SIGKILL; it forwards SIGUSR1 only with
`--signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1`.
"""
from __future__ import annotations

import signal
import sys
import threading
import time
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)
REPEAT_SECONDS = 1.0


class StopRequest:
    """Context manager that catches STOP_SIGNALS; `received` holds the first one that arrived
    (None until then), and a second SIGINT exits at once with 130. A signal the process was
    started ignoring (SIGHUP under nohup) stays ignored.

    Data-loader workers need `ignore_stop_signals` as their worker_init_fn: torch resets their
    SIGTERM handler, and a scheduler signals every process of the job.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS):
        self.signals = signals
        self.received: signal.Signals | None = None
        self.first_interrupt: float | None = None  # time.monotonic() of the first SIGINT
        self.previous: dict[signal.Signals, object] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
            for sig in self.signals:
                if signal.getsignal(sig) is not signal.SIG_IGN:  # ignored stays ignored: nohup, a shell's `&`
                    self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous.clear()

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT:
            if self.first_interrupt is None:
                self.first_interrupt = time.monotonic()
            elif time.monotonic() - self.first_interrupt > REPEAT_SECONDS:
                print("interrupted a second time: exiting at once, without saving this step", file=sys.stderr, flush=True)
                raise SystemExit(exit_code(signum))
        if self.received is None:  # the first signal decides the exit code
            self.received = signal.Signals(signum)

    @property
    def signal_number(self) -> int:
        """The number of the signal received, 0 if none (to agree over ranks with max_over_ranks)."""
        return int(self.received) if self.received is not None else 0


def exit_code(signal_number: int) -> int:
    """128 + the signal number, as a shell reports a process the signal ended (143 for SIGTERM)."""
    return 128 + signal_number


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader worker_init_fn: a loader worker ignores STOP_SIGNALS.

    A scheduler signals every process of the job; a worker killed by it makes the training
    process fail mid-step ("DataLoader worker is killed by signal"). The training process
    instead stops at the end of the step and shuts its workers down (they also exit by
    themselves when it dies).
    """
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
