"""util/stop_signals.py: SIGTERM and SIGUSR1 set a flag instead of killing, with the exit code a scheduler expects."""
from __future__ import annotations

import os
import signal

import pytest

from util.stop_signals import StopRequest, exit_code


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGUSR1, 138)])
def test_stop_signals_set_a_flag_instead_of_killing(sig, code):
    before = signal.getsignal(sig)
    with StopRequest() as stop:
        assert stop.received is None and stop.signal_number == 0
        os.kill(os.getpid(), sig)
        assert stop.received == sig and exit_code(stop.signal_number) == code
    assert signal.getsignal(sig) is before
