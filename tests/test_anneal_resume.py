"""``e2d2 pretrain`` with an annealed mask and the shift resumes bitwise: the annealing ratio
is a function of the step alone, so a run stopped at step 3 and continued to step 6 repeats
the uninterrupted run's losses exactly, and both record the same ratios."""

from __future__ import annotations

import pytest
from pretrain_helpers import make_data_dir, records, run_pretrain, train_losses, write_config

pytestmark = pytest.mark.slow

STEPS, ANNEAL = 6, 4


def test_annealed_run_resumes_bitwise(tmp_path):
    data = make_data_dir(tmp_path)
    # a constant LR, so that the run stopped at step 3 follows the same schedule
    config = write_config(tmp_path / "anneal.yaml", model={"shift": True},
                          diffusion={"anneal_steps": ANNEAL},
                          train={"steps": STEPS, "lr_decay": "constant"},
                          data={"path": str(data)}, checkpoint={"interval": 3})
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_pretrain(config, f"run.dir={straight}").returncode == 0
    first = run_pretrain(config, f"run.dir={resumed}", "train.steps=3")
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_pretrain(config, f"run.dir={resumed}", resume="auto")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stderr
    assert train_losses(resumed) == train_losses(straight)
    ratios = {r["step"]: r["anneal_ratio"] for r in records(resumed) if "loss" in r}
    assert ratios == {1: 0.0, 2: 0.25, 3: 0.5, 4: 0.75, 5: 1.0, 6: 1.0}
