"""Stop requests: preemption (SIGTERM, SIGUSR1) and Ctrl-C (SIGINT) end a run cleanly.

``STOP`` is installed by the CLI first thing in ``e2d2 pretrain``, before torch and megatron
are imported (which alone takes seconds), so a signal at any moment of the start-up (imports,
model and data build, checkpoint restore) is noted instead of killing the rank. The handler
only notes the signal; the run acts on it at its next safe point: during the start-up, before
anything is written (exit at once, nothing written); in the loop, after the step in flight
(save a checkpoint, exit). The exit code is ``PREEMPTED_EXIT_CODE`` after SIGTERM or SIGUSR1
(the sbatch template requeues on it), ``INTERRUPTED_EXIT_CODE`` after SIGINT alone. A second
SIGINT means "stop now": ``KeyboardInterrupt``, no save. An ignored SIGINT stays ignored, as
Python itself does.

SLURM delivers the signals to every process of the job step, the helpers of
dist_checkpointing included. Its writer processes are forked during a save and inherit the
noting handler, but its result-queue manager is a *spawned* process, with the default actions
(terminate): it would die, and the save with it. ``start_checkpoint_helpers`` therefore starts
that manager with the signals blocked (a blocked mask survives ``exec``, so they never reach
it); in this process they wait, pending, until the mask is restored.

This module is imported before torch: it imports nothing heavy at the top.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later"; the sbatch template requeues on it
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, as a shell reports Ctrl-C
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
STOP_SIGNALS = (*PREEMPTION_SIGNALS, signal.SIGINT)


def describe(code: int) -> str:
    """What a stop code means to the user, as the logs say it."""
    if code == PREEMPTED_EXIT_CODE:
        return "preempted"
    return "interrupted (Ctrl-C)"


def how_to_continue(code: int) -> str:
    if code == PREEMPTED_EXIT_CODE:
        return "requeue to continue"
    return "run the same command to continue"


def _stop_code(preempted: bool, interrupted: bool) -> int:
    if preempted:  # a preemption wins: the job must be requeued
        return PREEMPTED_EXIT_CODE
    return INTERRUPTED_EXIT_CODE if interrupted else 0


class StopRequests:
    """The stop signals this process received; ``requested()`` tells every rank."""

    def __init__(self) -> None:
        self.preempted = False
        self.interrupted = False
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        self.preempted = self.interrupted = False
        signals = [*PREEMPTION_SIGNALS]
        if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            signals.append(signal.SIGINT)
        self._previous = {sig: signal.signal(sig, self._handle) for sig in signals}
        # A rank of the local launcher starts with them blocked (launchers.local_launch): one
        # that arrived before this point is delivered now, to the handler.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    @contextlib.contextmanager
    def installed(self):
        self.install()
        try:
            yield self
        finally:
            self.uninstall()

    def _handle(self, signum, _frame) -> None:
        if signum != signal.SIGINT:
            self.preempted = True
            return
        if self.interrupted:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        self.interrupted = True
        rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
        if rank == "0":  # os.write: safe inside a handler, unlike print
            os.write(2, b"\ne2d2 pretrain: Ctrl-C: finishing the step in flight and saving a "
                        b"checkpoint; press Ctrl-C again to stop now\n")

    def code(self) -> int:
        """This process's stop code: 0 when no stop signal came."""
        return _stop_code(self.preempted, self.interrupted)

    def requested(self) -> int:
        """Collective: the stop code of the world (preempted if any rank was, else interrupted
        if any rank was), 0 when no rank received a stop signal."""
        import torch

        from megatron_ext.groups import collective_device

        flags = torch.tensor([float(self.preempted), float(self.interrupted)],
                             device=collective_device())
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        return _stop_code(*(bool(f) for f in flags.tolist()))

    def wait(self, timeout_s: float) -> None:
        """Collective: block until some rank is signalled (fault injection's ``hold@STEP`` and
        ``hold@startup``, so that a test's signal lands where it wants however fast the run)."""
        deadline = time.monotonic() + timeout_s
        while not self.requested():
            if time.monotonic() > deadline:
                raise RuntimeError(f"no stop signal within {timeout_s:.0f} s of the hold")
            time.sleep(0.05)


STOP = StopRequests()


def start_checkpoint_helpers() -> None:
    """Start dist_checkpointing's result-queue manager, deaf to the stop signals."""
    # megatron-core 0.16.1 creates this process on the first save and keeps it (a private
    # function; megatron_ext.cpu_compat pins the version).
    from megatron.core.dist_checkpointing.strategies.filesystem_async import (
        _get_write_results_queue,
    )

    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        _get_write_results_queue()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
