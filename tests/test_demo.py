"""``e2d2 demo`` runs the whole pipeline (data, PP2 pretraining on 2 gloo ranks, evaluation,
sampling, Hugging Face export loaded back by transformers, the offline lm-eval task), here
shortened to a few steps."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_pipeline_end_to_end(tmp_path):
    run_dir = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "launchers.cli", "demo", "--run-dir", str(run_dir),
         "train.steps=4", "train.eval_every=2"],
        capture_output=True, text=True, timeout=900,
        env={**os.environ, "OMP_NUM_THREADS": "1", "E2D2_TASK_PACK": str(tmp_path / "tasks"),
             "HF_DATASETS_CACHE": str(tmp_path / "hf-datasets")})
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for stage in ("== 1. data", "== 2. pretrain on 2 gloo ranks", "== 3. validation: NELBO",
                  "== 4. sample", "== 5. export", "== 6. lm-eval", "kjv_cloze accuracy"):
        assert stage in out, (stage, out)
    # The sample is a repr: quoted with " when the text has an apostrophe (CI once drew one).
    loaded = [line for line in out.splitlines() if line.startswith("transformers: ")]
    assert len(loaded) == 1, out
    assert ast.literal_eval(loaded[0].removeprefix("transformers: ")).startswith("And God said, ")
    assert (run_dir / "run" / "checkpoints" / "iter_0000004").is_dir()
    assert "pipeline stage 0: ranks [0]: encoder layers 0-3" in result.stderr, result.stderr
    assert "pipeline stage 1: ranks [1]: decoder layers 0-1" in result.stderr
    # A second demo replaces its own directory; a foreign directory is refused.
    foreign = tmp_path / "mine"
    foreign.mkdir()
    refused = subprocess.run([sys.executable, "-m", "launchers.cli", "demo", "--run-dir",
                              str(foreign)], capture_output=True, text=True)
    assert refused.returncode == 2 and "is not a demo directory" in refused.stderr
