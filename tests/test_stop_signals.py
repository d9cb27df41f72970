"""util/stop_signals.py: SIGTERM, SIGUSR1, SIGINT and SIGHUP set a flag instead of killing, with
the exit code a scheduler expects; a second Ctrl-C exits at once."""
from __future__ import annotations

import os
import signal

import pytest

from util import stop_signals
from util.stop_signals import StopRequest, exit_code


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGUSR1, 138)])
def test_stop_signals_set_a_flag_instead_of_killing(sig, code):
    before = signal.getsignal(sig)
    with StopRequest() as stop:
        assert stop.received is None and stop.signal_number == 0
        os.kill(os.getpid(), sig)
        assert stop.received == sig and exit_code(stop.signal_number) == code
    assert signal.getsignal(sig) is before


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGHUP, 129)])
def test_ctrl_c_and_a_closed_terminal_set_the_flag_too(sig, code):
    with StopRequest() as stop:
        os.kill(os.getpid(), sig)
        assert stop.received == sig and exit_code(stop.signal_number) == code
        os.kill(os.getpid(), signal.SIGTERM)  # torchrun's own shutdown signal that follows
        assert stop.received == sig  # the first signal decides


def test_a_second_ctrl_c_exits_at_once_but_a_relayed_one_does_not(monkeypatch, capsys):
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # torchrun relaying the same Ctrl-C, within REPEAT_SECONDS
        assert stop.received == signal.SIGINT
        monkeypatch.setattr(stop_signals, "REPEAT_SECONDS", 0.0)
        with pytest.raises(SystemExit) as stopped:
            os.kill(os.getpid(), signal.SIGINT)  # pressed again
    assert stopped.value.code == 130
    assert capsys.readouterr().err == "interrupted a second time: exiting at once, without saving this step\n"


def test_a_signal_ignored_from_the_start_stays_ignored():
    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as nohup starts a process
    try:
        with StopRequest() as stop:
            os.kill(os.getpid(), signal.SIGHUP)
            assert stop.received is None
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, before)
