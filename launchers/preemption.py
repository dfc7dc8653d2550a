"""Preemption: SIGTERM / SIGUSR1 (SLURM's ``--signal``) end a run cleanly.

The signal only sets a flag; the loop finishes the step in flight, saves a checkpoint and
exits with ``PREEMPTED_EXIT_CODE``. SLURM delivers the signal to every process of the job
step, the helpers that dist_checkpointing spawns to write a checkpoint included, and a
spawned helper has the default action (terminate), so a save would fail just when it is
needed. Checkpoint I/O therefore runs inside ``signals_deferred()``: the signals are
blocked in this process, so helpers spawned meanwhile inherit the block and never see them,
and a signal that arrives during the save is delivered to this process right after it.
"""

from __future__ import annotations

import contextlib
import signal

import torch

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later"; the sbatch template requeues on it
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preemption:
    """Installs the handlers; ``requested()`` tells every rank after the step in flight."""

    def __init__(self) -> None:
        self.flag = False
        for sig in PREEMPTION_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        self.flag = True

    def requested(self) -> bool:
        """Collective: whether any rank was signalled."""
        flag = torch.tensor([float(self.flag)])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())


@contextlib.contextmanager
def signals_deferred():
    """Block the preemption signals for the duration (see the module docstring)."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, PREEMPTION_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
