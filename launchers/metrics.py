"""What a run reports: ``metrics.jsonl`` for programs, TensorBoard for people (rank 0 only).

``metrics.jsonl`` holds one JSON object per line:

* training: ``{"step", "loss", "lr", "grad_norm", "tokens_per_s", "skipped", ...}``, every
  step, ``loss`` at full precision (Python's shortest round-trip repr), ``null`` when the
  step was skipped as non-finite;
* evaluation: ``{"step", "nelbo", "ppl", "nelbo_std_error", "eval_sequences"}``.

On resume the records after the resumed step (written before a crash) are dropped, so the
file always describes one history.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


def _finite_or_none(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every record of a run's ``metrics.jsonl`` (a missing file has none)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class RunLogger:
    """Writes a run's metrics; every method is a no-op on ranks other than 0."""

    def __init__(self, run_dir: Path, active: bool, tensorboard: bool, resume_step: int) -> None:
        self.active = active
        self.writer = None
        self.file = None
        if not active:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / METRICS_FILE
        kept = [r for r in read_metrics(run_dir) if r["step"] <= resume_step]
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, path)
        self.file = open(path, "a")  # noqa: SIM115 - kept open for the whole run
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a crashed attempt wrote after the resumed step.
            self.writer = SummaryWriter(str(run_dir / "tensorboard"),
                                        purge_step=resume_step + 1 if resume_step else None)

    def record(self, record: dict[str, Any], scalars: dict[str, float] | None = None) -> None:
        """Append ``record`` to metrics.jsonl; ``scalars`` (``tag: value``) go to TensorBoard."""
        if not self.active:
            return
        self.file.write(json.dumps({k: _finite_or_none(v) for k, v in record.items()}) + "\n")
        self.file.flush()
        if self.writer is not None and scalars:
            for tag, value in scalars.items():
                if value is not None and math.isfinite(value):
                    self.writer.add_scalar(tag, value, record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()
