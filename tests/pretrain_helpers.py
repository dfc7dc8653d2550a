"""Shared pieces of the ``e2d2 pretrain`` tests: a tiny corpus, a tiny config, real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from data_tools.corpus import iter_documents
from launchers.cli import main as e2d2_main
from launchers.metrics import read_metrics

TINY = {
    "model": {"variant": "e2d2", "vocab_size": 260, "mask_token_id": 259, "hidden_size": 32,
              "ffn_hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 2,
              "num_layers": 2, "num_decoder_layers": 1, "seq_length": 32, "block_size": 4},
    "train": {"steps": 4, "batch_size": 4, "lr": 3.0e-3, "warmup_steps": 1, "eval_every": 100,
              "eval_batches": 1, "eval_draws": 1},
    "checkpoint": {"interval": 2, "keep": 3},
    "log": {"interval": 1, "tensorboard": False},
}


def make_data_dir(root: Path, documents: int = 300) -> Path:
    """A bytes-tokenized KJV subset written by ``e2d2 data preprocess``."""
    corpus = root / "kjv.jsonl"
    with open(corpus, "w") as f:
        for _, text in zip(range(documents), iter_documents("kjv"), strict=False):
            f.write(json.dumps({"text": text}) + "\n")
    out = root / "data"
    assert e2d2_main(["data", "preprocess", "--input", str(corpus), "--tokenizer", "bytes",
                      "--output", str(out), "--valid-docs", "20"]) == 0
    return out


def write_config(path: Path, **sections) -> Path:
    cfg = {name: dict(values) for name, values in TINY.items()}
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    path.write_text(yaml.safe_dump(cfg))
    return path


def pretrain_command(config: Path, *overrides: str, nproc: int = 1, resume: str | None = None):
    cmd = [sys.executable, "-m", "launchers.cli", "pretrain", str(config), *overrides]
    if nproc > 1:
        cmd += ["--nproc-per-node", str(nproc)]
    if resume is not None:
        cmd += ["--resume", resume]
    return cmd


def _env(extra: dict[str, str] | None) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("E2D2_FAULTS", None)
    return {**env, **(extra or {})}


def run_pretrain(config: Path, *overrides: str, nproc: int = 1, resume: str | None = None,
                 env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    # Its own session: a fault-injected SIGKILL of the run's process group stays in the run.
    return subprocess.run(pretrain_command(config, *overrides, nproc=nproc, resume=resume),
                          env=_env(env), capture_output=True, text=True, timeout=timeout,
                          start_new_session=True)


def start_pretrain(config: Path, *overrides: str, nproc: int = 1, env=None) -> subprocess.Popen:
    """A background run in its own process group (so a test can kill every rank at once)."""
    return subprocess.Popen(pretrain_command(config, *overrides, nproc=nproc), env=_env(env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"run ended (code {proc.returncode}) before the awaited event:\n"
                                 + proc.stdout.read())
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.05)


def train_losses(run_dir: Path) -> dict[int, float | None]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def records(run_dir: Path) -> list[dict]:
    return read_metrics(run_dir)
