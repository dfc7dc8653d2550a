"""What a run reports: ``metrics.jsonl`` for programs, TensorBoard (and optionally W&B) for
people, a plain progress line for logs (rank 0 only).

``metrics.jsonl`` holds one JSON object per line:

* training: ``{"step", "loss", "lr", "grad_norm", "tokens_per_s", "skipped", ...}``, every
  step, ``loss`` at full precision (Python's shortest round-trip repr), ``null`` when the
  step was skipped as non-finite;
* evaluation: ``{"step", "nelbo", "ppl", "nelbo_std_error", "eval_sequences"}``.

On resume the records after the resumed step (written before a crash) are dropped, so the
file always describes one history, and a record of a step already logged (the evaluation of
a finished run that is resumed) is not written again, to any of the outputs.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb-run-id"  # the run's W&B id, so that a resumed run continues it


def _finite_or_none(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _kind(record: dict[str, Any]) -> str:
    return "eval" if "nelbo" in record else "train"


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every record of a run's ``metrics.jsonl`` (a missing file has none)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_loss_name(loss_weighting: str, variant: str) -> str:
    """What the training loss printed beside the validation NELBO is."""
    if variant == "ar":
        return "train loss (next-token NLL)"
    if loss_weighting == "elbo":
        return "train loss (ELBO-weighted: an estimate of the NELBO)"
    return "train loss (unweighted masked-token cross-entropy, not the NELBO)"


VALID_NELBO_NAME = "valid NELBO (held-out bound on the NLL, nats/token)"


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def progress_line(step: int, total: int, loss: float | None, scalars: dict[str, float],
                  elapsed_s: float, start_step: int) -> str:
    """One Megatron-style line for a log file: ``step N/T | loss | lr | grad norm |
    tokens/s | TFLOP/s | MFU | memory | data wait | elapsed | ETA``; ``scalars`` are
    TensorBoard's (``perf/mfu`` only on GPU). The ETA extrapolates this session's pace."""
    done = step - start_step
    eta = elapsed_s / done * (total - step) if done > 0 else math.nan
    parts = [f"step {step}/{total}",
             "loss " + ("skipped (non-finite)" if loss is None or not math.isfinite(loss)
                        else f"{loss:.4f}"),
             f"lr {scalars['train/lr']:.3e}",
             f"grad norm {scalars['train/grad_norm']:.3f}",
             f"{scalars['perf/tokens_per_s']:,.0f} tokens/s",
             f"{scalars['perf/tflops']:.3g} TFLOP/s"]
    if "perf/mfu" in scalars:
        parts.append(f"MFU {100 * scalars['perf/mfu']:.1f}%")
    parts += [f"mem {scalars['perf/peak_memory_gb']:.1f} GB",
              f"data wait {scalars['perf/data_wait_s']:.3f} s",
              f"elapsed {_duration(elapsed_s)}",
              f"ETA {_duration(eta) if math.isfinite(eta) else '?'}"]
    return " | ".join(parts)


class Progress:
    """Where training progress goes on rank 0: a tqdm bar on a terminal; plain
    ``progress_line``s every ``log.interval`` steps otherwise (SLURM logs, pipes), where a
    bar would be one long line of carriage returns."""

    def __init__(self, total: int, initial: int, active: bool, loss_name: str,
                 tty: bool | None = None) -> None:
        import sys

        self.total, self.start_step, self.active = total, initial, active
        self.started = time.perf_counter()
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.bar = None
        if active:
            print(f"e2d2 pretrain: 'loss' is the {loss_name}; the evaluation reports the "
                  f"{VALID_NELBO_NAME}", file=sys.stderr, flush=True)
        if active and self.tty:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="pretrain", unit="step",
                            dynamic_ncols=True)

    def step(self, step: int, loss: float | None, tokens_per_s: float,
             scalars: dict[str, float]) -> None:
        """After each step; ``scalars`` non-empty on logging steps."""
        if not self.active:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}" if loss is not None else "skipped",
                                 tok_s=f"{tokens_per_s:,.0f}")
        elif scalars:
            import sys

            print(progress_line(step, self.total, loss, scalars,
                                time.perf_counter() - self.started, self.start_step),
                  file=sys.stderr, flush=True)

    def write(self, message: str) -> None:
        """A message that does not break the bar."""
        import sys

        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class RunLogger:
    """Writes a run's metrics; every method is a no-op on ranks other than 0.

    ``wandb``: the ``log.wandb`` mapping (``project``, ``entity``, ``mode``) or None (no W&B,
    the default). W&B gets the same scalars as TensorBoard, in the same run across resumes
    (its id is kept in ``RUN_DIR/wandb-run-id``); it is imported and contacted only when
    asked for, and ``mode: offline`` never touches the network.
    """

    def __init__(self, run_dir: Path, active: bool, tensorboard: bool, resume_step: int,
                 wandb: dict[str, Any] | None = None, config: dict[str, Any] | None = None
                 ) -> None:
        self.active = active
        self.writer = None
        self.wandb_run = None
        self.file = None
        if not active:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / METRICS_FILE
        kept = [r for r in read_metrics(run_dir) if r["step"] <= resume_step]
        self.logged = {(r["step"], _kind(r)) for r in kept}
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, path)
        self.file = open(path, "a")  # noqa: SIM115 - kept open for the whole run
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops the events a crashed attempt wrote after the resumed step.
            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1)
        if wandb is not None:
            self.wandb_run = _start_wandb(run_dir, wandb, config)

    def record(self, record: dict[str, Any], scalars: dict[str, float] | None = None) -> None:
        """Append ``record`` to metrics.jsonl; ``scalars`` (``tag: value``) go to TensorBoard
        and W&B. A step already logged (with a record of the same kind) is skipped."""
        if not self.active:
            return
        key = (record["step"], _kind(record))
        if key in self.logged:
            return
        self.logged.add(key)
        self.file.write(json.dumps({k: _finite_or_none(v) for k, v in record.items()}) + "\n")
        self.file.flush()
        finite = {tag: value for tag, value in (scalars or {}).items()
                  if value is not None and math.isfinite(value)}
        if self.writer is not None:
            for tag, value in finite.items():
                self.writer.add_scalar(tag, value, record["step"])
        if self.wandb_run is not None and finite:
            self.wandb_run.log(finite, step=record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def _start_wandb(run_dir: Path, options: dict[str, Any], config: dict[str, Any] | None):
    try:
        import wandb
    except ImportError:
        from e2d2.errors import UserError

        raise UserError("log.wandb is set but wandb is not installed: pip install "
                        "'e2d2[wandb]', or remove log.wandb") from None
    id_file = run_dir / WANDB_ID_FILE
    if id_file.is_file():
        run_id = id_file.read_text().strip()
    else:
        run_id = uuid.uuid4().hex[:12]
        id_file.write_text(run_id + "\n")
    return wandb.init(project=options["project"], entity=options.get("entity"),
                      mode=options.get("mode", "online"), dir=str(run_dir), id=run_id,
                      resume="allow", name=run_dir.name, config=config)
