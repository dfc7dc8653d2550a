"""``e2d2 pretrain --nproc-per-node N``: N local ranks without torchrun (laptops, CI).

Each rank is ``python -m launchers.cli ...`` with torchrun's variables (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT).

Signals (``launchers.preemption``): SIGTERM and SIGUSR1 are forwarded to every rank, so
preemption behaves as under SLURM. The ranks start with the stop signals blocked, and unblock
them once their handlers are in place: a signal during a rank's own start-up waits for it
instead of killing it. A signal before any rank started ends the launch at once. SIGINT is not
forwarded: the ranks share the launcher's process group, so a Ctrl-C in the terminal reaches
each of them once (forwarded, it would count twice, and the second means "stop now"); stop
the launcher from elsewhere with SIGTERM.

Exit code: 0 when every rank succeeded; the first failing rank's code (in time), else the
stop code of the ranks (preempted before interrupted). When a rank fails, the others (which
would wait in a collective forever) are stopped; a rank that fails only because a peer died
stays silent (``launchers.world.reported_once``), so the console shows the first error once.

The launcher hosts the rendezvous store itself, as torchrun's agent does
(``TORCHELASTIC_USE_AGENT_STORE``): it binds port 0, so the OS gives it a free port that
nobody can take between the choice and the bind (runs started at the same time, as in a
parallel test suite, would otherwise race for a port probed free). Living in the launcher,
the store outlives a failed rank, so its peers can read the error it recorded there.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import timedelta

from launchers.preemption import (
    INTERRUPTED_EXIT_CODE,
    PREEMPTED_EXIT_CODE,
    PREEMPTION_SIGNALS,
    STOP,
    STOP_SIGNALS,
    describe,
)

STOP_CODES = (PREEMPTED_EXIT_CODE, INTERRUPTED_EXIT_CODE)  # preempted first: it wins
PEER_GRACE_S = 10.0  # a failed rank's peers get this long to stop on their own


def launch_local(nproc: int, argv: list[str]) -> int:
    if nproc < 1:
        raise ValueError(f"--nproc-per-node must be >= 1, got {nproc}")
    from torch.distributed import TCPStore

    if STOP.code():  # signalled while the launcher itself started
        print(f"e2d2 {argv[0]}: {describe(STOP.code())} before the ranks started; exiting with "
              f"code {STOP.code()}", file=sys.stderr)
        return STOP.code()
    # Alive until every rank has exited: the ranks' process groups live on it.
    store = TCPStore("127.0.0.1", 0, nproc, is_master=True, timeout=timedelta(minutes=30),
                     wait_for_workers=False)
    threads = max(1, (os.cpu_count() or 1) // nproc)
    procs: list[subprocess.Popen] = []
    received: set[int] = set()

    def forward(signum, _frame):
        received.add(signum)
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in PREEMPTION_SIGNALS}
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        # Not forwarded (the terminal delivers it to the ranks), nor fatal here: the launcher
        # waits for the ranks to save and stop.
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, lambda *_: None)
    try:
        # Blocked in this thread while the ranks are spawned, so that they inherit the mask.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            for rank in range(nproc):
                env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(nproc),
                       "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(nproc),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port),
                       "TORCHELASTIC_USE_AGENT_STORE": "True",
                       "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads))}
                procs.append(subprocess.Popen([sys.executable, "-m", "launchers.cli", *argv],
                                              env=env))
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        # Another thread of this process (the store's) may have taken a signal meanwhile, and
        # it was forwarded only to the ranks started by then: now to all (a repeated SIGTERM or
        # SIGUSR1 changes nothing).
        for signum in sorted(received):
            forward(signum, None)
        return _wait(procs)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _wait(procs: list[subprocess.Popen]) -> int:
    first_failure = failed_at = None
    while True:
        codes = [proc.poll() for proc in procs]
        if first_failure is None:
            failure = next((c for c in codes if c not in (None, 0, *STOP_CODES)), None)
            if failure is not None:
                first_failure, failed_at = failure, time.monotonic()
        if all(c is not None for c in codes):
            break
        # A failed rank's peers block in collectives: give them a moment to fail on their
        # own, then stop them.
        if failed_at is not None and time.monotonic() - failed_at > PEER_GRACE_S:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
        time.sleep(0.1)
    if first_failure is not None:
        return first_failure if first_failure > 0 else 1
    return next((code for code in STOP_CODES if code in codes), 0)
