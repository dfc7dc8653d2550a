"""Where each sweep run stands: pending, running, done, stale or failed.

A run is *done* when its run directory holds ``summary.json`` (written by ``e2d2 pretrain``
on success) and ``sampling.json`` (the benchmark), and its saved ``config.yaml`` is the
config the spec resolves to now. A run directory trained on another config (the spec has
changed since) is *stale*: ``submit`` sets it aside and runs it again, ``collect`` leaves it
out. Otherwise its state comes from the job
recorded in ``OUTPUT/state.json`` by ``e2d2 sweep submit``: SLURM's view of the job
(``squeue``), or, for ``--local`` runs, the recorded exit code and process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from e2d2.errors import ConfigError
from launchers.config import load_run_config
from launchers.submit import write_text_atomic
from launchers.sweep.bench import RESULT_FILE
from launchers.sweep.spec import Point, SweepSpec

STATE_FILE = "state.json"
SUMMARY_FILE = "summary.json"
_QUEUED = {"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING",
           "SUSPENDED", "PREEMPTED"}
_RUNNING = {"RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING"}


@dataclass(frozen=True)
class PointStatus:
    point: Point
    state: str  # "pending" | "running" | "done" | "stale" | "failed"
    detail: str  # e.g. "not submitted", "job 12_0 RUNNING", "exit code 1"
    step: int | None = None  # last training step in metrics.jsonl
    loss: float | None = None  # its training loss
    nelbo: float | None = None  # last validation NELBO

    @property
    def submitted(self) -> bool:
        return self.detail != "not submitted"


def read_state(spec: SweepSpec) -> dict[str, Any]:
    path = spec.output / STATE_FILE
    if not path.is_file():
        return {"points": {}}
    return json.loads(path.read_text())


def write_state(spec: SweepSpec, state: dict[str, Any]) -> None:
    write_text_atomic(spec.output / STATE_FILE, json.dumps(state, indent=2) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSON-lines file; a torn last line (a run killed mid-write) is skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def last_metrics(run_dir: Path) -> tuple[int | None, float | None, float | None]:
    step = loss = nelbo = None
    for record in read_jsonl(run_dir / "metrics.jsonl"):
        if "loss" in record:
            step, loss = record["step"], record["loss"]
        if "nelbo" in record:
            nelbo = record["nelbo"]
    return step, loss, nelbo


def is_done(run_dir: Path) -> bool:
    return (run_dir / SUMMARY_FILE).is_file() and (run_dir / RESULT_FILE).is_file()


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(point: Point) -> list[str]:
    """``key: saved -> wanted`` for each setting in which the run directory's saved
    ``config.yaml`` differs from what the spec resolves to now (empty: the same run)."""
    saved_path = point.run_dir / "config.yaml"
    if not saved_path.is_file():
        return []
    try:
        saved = _flat(load_run_config(saved_path).to_dict())
    except ConfigError as exc:  # a config of an older code version or a damaged file
        return [f"config.yaml does not load ({exc})"]
    wanted = _flat(point.config.to_dict())
    return [f"{key}: {saved.get(key)!r} -> {wanted.get(key)!r}"
            for key in sorted(set(saved) | set(wanted)) if saved.get(key) != wanted.get(key)]


def slurm_job_states() -> dict[str, str] | None:
    """``{job id: state}`` of this user's jobs, array tasks expanded (``123_4``); None
    without SLURM."""
    squeue = shutil.which("squeue")
    if squeue is None:
        return None
    done = subprocess.run([squeue, "--me", "-h", "-r", "-t", "all", "-o", "%i|%T"],
                          capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        return None
    states = {}
    for line in done.stdout.splitlines():
        job, _, state = line.partition("|")
        states[job.strip()] = state.strip()
    return states


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def point_status(point: Point, record: dict | None, queue: dict[str, str] | None) -> PointStatus:
    metrics = last_metrics(point.run_dir)
    changes = config_changes(point)
    if not changes and is_done(point.run_dir):
        return PointStatus(point, "done", "finished", *metrics)
    status = _job_status(point, record, queue, metrics)
    # a run still queued or running is left alone; once it has ended, it is stale
    if changes and not (status.submitted and status.state in ("pending", "running")):
        return PointStatus(point, "stale", "trained on another config: " + "; ".join(changes),
                           *metrics)
    return status


def _job_status(point: Point, record: dict | None, queue: dict[str, str] | None,
                metrics: tuple) -> PointStatus:
    """The state of the run's job: not submitted, queued, running or ended without a
    finished run (failed)."""
    if record is None:
        return PointStatus(point, "pending", "not submitted", *metrics)
    job = record["job"]
    if job == "local":
        if record.get("rc") is None:
            if _pid_alive(record["pid"]):
                return PointStatus(point, "running", f"local pid {record['pid']}", *metrics)
            return PointStatus(point, "failed", "local run interrupted", *metrics)
        return PointStatus(point, "failed", f"local run exited with {record['rc']}", *metrics)
    state = None if queue is None else queue.get(job)
    if state in _QUEUED:
        return PointStatus(point, "pending", f"job {job} {state}", *metrics)
    if state in _RUNNING:
        return PointStatus(point, "running", f"job {job} {state}", *metrics)
    if state is None:
        why = "SLURM is not reachable" if queue is None else "no longer known to SLURM"
        return PointStatus(point, "failed", f"job {job} {why}", *metrics)
    return PointStatus(point, "failed", f"job {job} {state}", *metrics)


def sweep_status(spec: SweepSpec) -> list[PointStatus]:
    records = read_state(spec)["points"]
    needs_slurm = any(r.get("job") != "local" for r in records.values())
    queue = slurm_job_states() if needs_slurm else {}
    return [point_status(p, records.get(p.name), queue) for p in spec.points]


def format_status(statuses: list[PointStatus]) -> str:
    def num(value, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    rows = [("point", "state", "step", "loss", "nelbo", "detail")]
    rows += [(s.point.name, s.state, num(s.step, "d"), num(s.loss, ".4f"), num(s.nelbo, ".4f"),
              s.detail) for s in statuses]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in rows]
    counts = {state: sum(s.state == state for s in statuses)
              for state in ("done", "running", "pending", "stale", "failed")}
    lines.append(", ".join(f"{n} {state}" for state, n in counts.items()))
    return "\n".join(lines)
