"""A run's checkpoints: ``RUN/checkpoints/iter_NNNNNNN/`` directories and a ``latest`` file.

* A checkpoint is written to ``iter_NNNNNNN.partial``, and renamed to ``iter_NNNNNNN`` only
  after every rank has finished writing; then rank 0 replaces ``latest`` atomically. So a
  crash (even ``kill -9``) mid-write leaves ``latest`` naming the previous, complete one,
  and a directory named ``iter_*`` without a suffix is always complete.
* Each iteration directory holds megatron's dist_checkpointing files (see
  ``megatron_ext.checkpoint``) and a plain ``config.yaml``, the resolved run config.
  The names and how a path resolves to a checkpoint: `launchers.checkpoint_dirs`.
* ``keep`` newest checkpoints are kept; older ones are deleted after ``latest`` moves on.
* Resume (``load``) tries ``latest`` first, then older complete checkpoints, newest first,
  saying which one it falls back to and why.
* A resume from step ``k`` abandons the trajectory after ``k``: this run's checkpoints of later
  steps are moved to ``abandoned/`` (``abandon_after``, which says so), and ``latest`` names
  the newest one left. Retention therefore only ever counts the current trajectory, and a
  new checkpoint is always the newest.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.api import CheckpointException

from e2d2.errors import UserError
from launchers.checkpoint_dirs import (
    ABANDONED,
    ITER_DIR,
    LATEST,
    checkpoint_step,
    complete_checkpoints,
    iteration_dir,
    latest_checkpoint,
)
from launchers.config import RunConfig, save_run_config
from megatron_ext import checkpoint as engine_checkpoint
from megatron_ext.groups import any_rank


def _is_rank0() -> bool:
    return torch.distributed.get_rank() == 0


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RunCheckpoints:
    """Save, prune and resume the checkpoints of one run directory. Collective methods must be
    called on every rank."""

    def __init__(self, run_dir: Path, keep: int) -> None:
        self.root = run_dir / "checkpoints"
        self.keep = keep

    def save(self, step: int, cfg: RunConfig, chunks, optimizer, ema, common: dict[str, Any],
             kill_after_write: bool = False) -> Path:
        """Collective: the full training state at ``step``; returns the iteration directory.
        ``kill_after_write`` (fault injection) SIGKILLs this rank's process group (the rank
        and the writer processes dist_checkpointing started, as when a node dies) once its
        shards are written, before the checkpoint is complete."""
        final = iteration_dir(self.root, step)
        partial = final.with_name(final.name + ".partial")
        if _is_rank0():
            self.root.mkdir(parents=True, exist_ok=True)
            # A partial write of an earlier (killed) attempt at this step, or a complete
            # checkpoint of an abandoned future (a resume from an older one): replace it.
            for stale in (partial, final):
                if stale.exists():
                    shutil.rmtree(stale)
        torch.distributed.barrier()
        engine_checkpoint.save_training_state(partial, chunks, optimizer, ema, common)
        if kill_after_write:
            os.killpg(os.getpgid(0), signal.SIGKILL)
        torch.distributed.barrier()  # every rank's shards are on disk
        if _is_rank0():
            save_run_config(cfg, partial / "config.yaml")
            os.replace(partial, final)
            _write_atomic(self.root / LATEST, final.name + "\n")
            # Every checkpoint here is of this trajectory (``abandon_after`` moved the others
            # away on resume), so the newest ``keep`` by step include the one just written.
            for old in complete_checkpoints(self.root)[self.keep:]:
                shutil.rmtree(old, ignore_errors=True)
        torch.distributed.barrier()
        return final

    def candidates(self) -> list[Path]:
        """Checkpoints to resume from, in order of preference: ``latest``, then older ones."""
        latest = latest_checkpoint(self.root)
        ordered = complete_checkpoints(self.root)
        if latest is not None and ITER_DIR.match(latest.name):
            ordered = [latest] + [p for p in ordered
                                  if checkpoint_step(p) < checkpoint_step(latest)]
        return ordered

    def abandon_after(self, step: int) -> list[Path]:
        """Collective, after resuming from ``step``: move this run's checkpoints of later steps
        (the trajectory the resume abandons) to ``abandoned/``, so that retention never counts
        them ahead of the new ones. Returns where they went (on rank 0; empty elsewhere)."""
        moved = []
        if _is_rank0():
            ours = complete_checkpoints(self.root)
            later = [p for p in ours if checkpoint_step(p) > step]
            if later:
                # ``latest`` first: a crash part-way still leaves it naming a checkpoint.
                kept = [p for p in ours if checkpoint_step(p) <= step]
                if kept:
                    _write_atomic(self.root / LATEST, kept[0].name + "\n")
                else:
                    (self.root / LATEST).unlink(missing_ok=True)
                aside = self.root / ABANDONED
                aside.mkdir(exist_ok=True)
                for path in later:
                    target = aside / path.name
                    copy = 1
                    while target.exists():  # abandoned before, by an earlier resume
                        target = aside / f"{path.name}.{copy}"
                        copy += 1
                    os.replace(path, target)
                    moved.append(target)
        torch.distributed.barrier()
        return moved

    def load(self, candidates: list[Path], chunks, optimizer, ema, same_layout) -> tuple[Path, dict]:
        """Collective: load the first candidate every rank can read; ``same_layout(common)``
        says whether RNG states can be restored. Raises UserError when none loads."""
        failures = []
        for path in candidates:
            error = None
            try:
                common = engine_checkpoint.read_common(path)
                engine_checkpoint.load_training_state(path, chunks, optimizer, ema,
                                                      restore_rng=same_layout(common))
            except engine_checkpoint.ModelMismatchError:
                raise  # another model: an older checkpoint of this run would not help
            # A corrupt file surfaces as anything; torch's CheckpointException is a BaseException.
            except (Exception, CheckpointException) as exc:  # noqa: BLE001
                where = traceback.extract_tb(exc.__traceback__)[-1]
                error = f"{type(exc).__name__} at {where.filename}:{where.lineno}: {exc}"
            if _all_ranks_ok(error is None):
                return path, common
            failures.append(f"{path.name}: {error or 'unreadable on another rank'}")
            if _is_rank0():
                print(f"e2d2: checkpoint {path} could not be loaded ({failures[-1]}); "
                      "falling back to the previous one", file=sys.stderr)
        raise UserError("no checkpoint could be loaded: " + "; ".join(failures)
                        + ". Resume from a good one with --resume PATH or start over with "
                        "--resume none and a new run.dir")


def _all_ranks_ok(ok: bool) -> bool:
    return not any_rank(not ok)
