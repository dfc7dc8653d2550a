"""``e2d2 pretrain --nproc-per-node N``: N local ranks without torchrun (laptops, CI).

Each rank is ``python -m launchers.cli ...`` with torchrun's variables (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT). SIGTERM, SIGUSR1 and SIGINT are forwarded to every
rank, so preemption behaves as under SLURM. When a rank fails, the others (which would wait
in a collective forever) are stopped. The exit code is 0 when every rank succeeded, the
preempted code when the ranks stopped for preemption, else the first failure's.

The launcher hosts the rendezvous store itself, as torchrun's agent does
(``TORCHELASTIC_USE_AGENT_STORE``): it binds port 0, so the OS gives it a free port that
nobody can take between the choice and the bind (runs started at the same time, as in a
parallel test suite, would otherwise race for a port probed free).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import timedelta

_FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def launch_local(nproc: int, argv: list[str], preempted_code: int) -> int:
    if nproc < 1:
        raise ValueError(f"--nproc-per-node must be >= 1, got {nproc}")
    from torch.distributed import TCPStore

    # Alive until every rank has exited: the ranks' process groups live on it.
    store = TCPStore("127.0.0.1", 0, nproc, is_master=True, timeout=timedelta(minutes=30),
                     wait_for_workers=False)
    threads = max(1, (os.cpu_count() or 1) // nproc)
    procs = []
    for rank in range(nproc):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(nproc),
               "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(nproc),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port),
               "TORCHELASTIC_USE_AGENT_STORE": "True",
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads))}
        procs.append(subprocess.Popen([sys.executable, "-m", "launchers.cli", *argv], env=env))

    def forward(signum, _frame):
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in _FORWARDED}
    try:
        return _wait(procs, preempted_code)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _wait(procs: list[subprocess.Popen], preempted_code: int) -> int:
    failed_at = None
    while any(proc.poll() is None for proc in procs):
        codes = [proc.poll() for proc in procs]
        if failed_at is None and any(c not in (None, 0, preempted_code) for c in codes):
            failed_at = time.monotonic()
        # A failed rank's peers block in collectives: give them a moment to fail on their
        # own (their error is often the informative one), then stop them.
        if failed_at is not None and time.monotonic() - failed_at > 10:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
        time.sleep(0.1)
    codes = [proc.returncode for proc in procs]
    failures = [c for c in codes if c not in (0, preempted_code)]
    if failures:
        return failures[0] if failures[0] > 0 else 1
    return preempted_code if preempted_code in codes else 0
