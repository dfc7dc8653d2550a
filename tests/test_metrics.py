"""What a run reports: plain log lines off a terminal, the two losses named, no step logged
twice after a resume, and W&B (offline) with TensorBoard's scalars."""

from __future__ import annotations

import math

import pytest

from e2d2.errors import ConfigError
from launchers.config import LogSection
from launchers.metrics import (
    VALID_NELBO_NAME,
    Progress,
    RunLogger,
    progress_line,
    read_metrics,
    train_loss_name,
)

SCALARS = {"train/loss": 3.4, "train/lr": 3e-4, "train/grad_norm": 0.81,
           "perf/tokens_per_s": 12345.0, "perf/tflops": 45.2, "perf/peak_memory_gb": 12.3,
           "perf/data_wait_s": 0.01}


def test_progress_line_has_every_field():
    line = progress_line(120, 1000, 3.40123, {**SCALARS, "perf/mfu": 0.312}, 600.0, 20)
    for part in ("step 120/1000", "loss 3.4012", "lr 3.000e-04", "grad norm 0.810",
                 "12,345 tokens/s", "45.2 TFLOP/s", "MFU 31.2%", "mem 12.3 GB",
                 "data wait 0.010 s", "elapsed 0:10:00", "ETA 1:28:00"):
        assert part in line, (part, line)
    assert "MFU" not in progress_line(1, 10, math.nan, SCALARS, 1.0, 0)  # no GPU, no MFU
    assert "loss skipped (non-finite)" in progress_line(1, 10, math.nan, SCALARS, 1.0, 0)


def test_off_a_terminal_progress_is_plain_lines_every_interval(capsys):
    progress = Progress(4, 0, active=True, loss_name=train_loss_name("none", "e2d2"), tty=False)
    for step in range(1, 5):
        progress.step(step, 3.0, 100.0, SCALARS if step % 2 == 0 else {})
    progress.close()
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert "unweighted masked-token cross-entropy" in lines[0] and VALID_NELBO_NAME in lines[0]
    assert [line.split(" | ")[0] for line in lines[1:]] == ["step 2/4", "step 4/4"]


def test_the_losses_are_named():
    assert "NELBO" in train_loss_name("elbo", "bd3lm")
    assert "next-token" in train_loss_name("none", "ar")


def _events(run_dir) -> dict[str, list[int]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {tag: [e.step for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _train(logger, steps):
    for step in steps:
        logger.record({"step": step, "loss": 1.0}, {"train/loss": 1.0 / step})


def test_a_resume_logs_no_step_twice(tmp_path):
    logger = RunLogger(tmp_path, True, True, 0)
    logger.record({"step": 0, "nelbo": 5.0, "ppl": 1.0}, {"valid/nelbo": 5.0})
    _train(logger, range(1, 5))
    logger.record({"step": 4, "nelbo": 4.0, "ppl": 1.0}, {"valid/nelbo": 4.0})
    _train(logger, [5, 6])  # after the checkpoint of step 4: lost in a crash
    logger.close()
    # resumed at step 4 (a finished run's evaluation is repeated), then steps 5, 6 again
    logger = RunLogger(tmp_path, True, True, 4)
    logger.record({"step": 4, "nelbo": 4.0, "ppl": 1.0}, {"valid/nelbo": 4.0})
    _train(logger, [5, 6])
    logger.close()
    assert [(r["step"], "nelbo" in r) for r in read_metrics(tmp_path)] == [
        (0, True), (1, False), (2, False), (3, False), (4, False), (4, True), (5, False),
        (6, False)]
    events = _events(tmp_path)
    assert events["valid/nelbo"] == [0, 4]
    assert events["train/loss"] == [1, 2, 3, 4, 5, 6]


def test_wandb_offline_gets_the_tensorboard_scalars_and_one_run_across_resumes(
        tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    # nothing may reach a server: an unroutable address would make any attempt fail
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    options = {"project": "e2d2-test", "mode": "offline"}
    logger = RunLogger(tmp_path, True, False, 0, options, {"train": {"steps": 4}})
    _train(logger, [1, 2])
    logger.record({"step": 2, "nelbo": 4.0, "ppl": 1.0}, {"valid/nelbo": 4.0})
    _train(logger, [3])  # W&B commits a step when the next one starts
    run = logger.wandb_run
    assert run.summary["train/loss"] == 0.5 and run.summary["valid/nelbo"] == 4.0
    assert run.config["train"] == {"steps": 4}
    logger.close()
    first_id = (tmp_path / "wandb-run-id").read_text().strip()
    logger = RunLogger(tmp_path, True, False, 3, options)
    assert logger.wandb_run.id == first_id
    _train(logger, [4, 5])
    assert logger.wandb_run.summary["train/loss"] == 0.25
    logger.close()
    assert list((tmp_path / "wandb").glob(f"offline-run-*-{first_id}/run-{first_id}.wandb"))


def test_wandb_is_off_by_default_and_checked():
    assert LogSection().wandb is None
    assert LogSection(wandb={"project": "p", "mode": "offline"}).wandb["mode"] == "offline"
    for bad, message in (({"mode": "offline"}, "needs project"),
                         ({"project": "p", "mode": "sometimes"}, "choose one of"),
                         ({"project": "p", "team": "x"}, "unknown key")):
        with pytest.raises(ConfigError, match=message):
            LogSection(wandb=bad)
