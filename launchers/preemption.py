"""Preemption: SIGTERM / SIGUSR1 (SLURM's ``--signal``) end a run cleanly.

The signal only sets a flag; the loop finishes the step in flight, saves a checkpoint and
exits with ``PREEMPTED_EXIT_CODE``. SLURM delivers the signal to every process of the job
step, the helpers of dist_checkpointing included. Its writer processes are forked during a
save and inherit the flag-setting handler, but its result-queue manager is a *spawned*
process, with the default action (terminate): it would die, and the preemption save with
it. ``Preemption`` therefore starts that manager first, with both signals ignored (an
ignored disposition survives ``exec``), and only then installs the handlers.
"""

from __future__ import annotations

import signal
import time

from megatron_ext.groups import any_rank

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later"; the sbatch template requeues on it
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def _start_checkpoint_helpers() -> None:
    # megatron-core 0.16.1 creates this process on the first save and keeps it (a private
    # function; megatron_ext.cpu_compat pins the version).
    from megatron.core.dist_checkpointing.strategies.filesystem_async import (
        _get_write_results_queue,
    )

    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in PREEMPTION_SIGNALS}
    try:
        _get_write_results_queue()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class Preemption:
    """Installs the handlers; ``requested()`` tells every rank after the step in flight."""

    def __init__(self) -> None:
        self.flag = False
        _start_checkpoint_helpers()
        for sig in PREEMPTION_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        self.flag = True

    def wait(self, timeout_s: float) -> None:
        """Collective: block until some rank is signalled (fault injection's ``hold@STEP``, so
        that a test's signal lands mid-run however fast the run is)."""
        deadline = time.monotonic() + timeout_s
        while not self.requested():
            if time.monotonic() > deadline:
                raise RuntimeError(f"no preemption signal within {timeout_s:.0f} s of the hold")
            time.sleep(0.05)

    def requested(self) -> bool:
        """Collective: whether any rank was signalled."""
        return any_rank(self.flag)
