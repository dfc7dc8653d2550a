"""Stop signals and the local launcher's verdict, in-process and with tiny real processes.

* SIGTERM/SIGUSR1 note a preemption (75), SIGINT an interruption (130); a second SIGINT
  stops now (KeyboardInterrupt); a SIGINT ignored at start stays ignored;
* a signal that arrives while the stop signals are blocked (a rank of the local launcher
  before its handlers exist) is delivered to the handler once it is installed;
* the local launcher's exit code is the first failure in time, not in rank order, and
  otherwise the ranks' stop code (preempted before interrupted).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from launchers.local_launch import _wait
from launchers.preemption import (
    INTERRUPTED_EXIT_CODE,
    PREEMPTED_EXIT_CODE,
    StopRequests,
)


@pytest.fixture
def stops():
    requests = StopRequests()
    with requests.installed():
        yield requests


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_preemption_signal_is_noted_not_fatal(stops, sig):
    os.kill(os.getpid(), sig)
    assert stops.preempted and stops.code() == PREEMPTED_EXIT_CODE


def test_ctrl_c_is_noted_once_and_stops_now_the_second_time(stops):
    os.kill(os.getpid(), signal.SIGINT)
    assert stops.interrupted and stops.code() == INTERRUPTED_EXIT_CODE
    os.kill(os.getpid(), signal.SIGTERM)
    assert stops.code() == PREEMPTED_EXIT_CODE  # the job must be requeued
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)


def test_an_ignored_sigint_stays_ignored():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with StopRequests().installed() as stops:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)
            assert stops.code() == 0
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_signal_received_while_blocked_reaches_the_handler_once_installed():
    # A fresh interpreter with the signals blocked, as the local launcher starts a rank (in a
    # process with other threads, one of them would take the signal instead).
    script = """
import os, signal
from launchers.preemption import STOP_SIGNALS, StopRequests
signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
os.kill(os.getpid(), signal.SIGTERM)  # pending: a blocked signal is not lost
with StopRequests().installed() as stops:
    print(stops.code())
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == str(PREEMPTED_EXIT_CODE), out.stderr


def _rank(code: int, after_s: float = 0.0) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c",
                             f"import sys, time; time.sleep({after_s}); sys.exit({code})"])


def test_the_launcher_reports_the_first_failure_in_time_not_in_rank_order():
    # Rank 0 fails late (as a rank does whose collective broke when its peer left), rank 1
    # first with the error that matters.
    assert _wait([_rank(1, after_s=1.0), _rank(2)]) == 2


@pytest.mark.parametrize("codes,expected", [
    ((0, 0), 0),
    ((PREEMPTED_EXIT_CODE, PREEMPTED_EXIT_CODE), PREEMPTED_EXIT_CODE),
    ((INTERRUPTED_EXIT_CODE, INTERRUPTED_EXIT_CODE), INTERRUPTED_EXIT_CODE),
    ((INTERRUPTED_EXIT_CODE, PREEMPTED_EXIT_CODE), PREEMPTED_EXIT_CODE),
])
def test_the_launcher_reports_the_ranks_stop_code(codes, expected):
    assert _wait([_rank(code) for code in codes]) == expected
