"""benchmarks/gpu_check.py runs end to end on CPU with --tiny and prints every section."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_gpu_check_tiny_prints_the_whole_report(capsys):
    from benchmarks import gpu_check

    gpu_check.main(["--tiny"])
    out = capsys.readouterr().out
    for heading in ("# E2D2 GPU check", "## 1. Accuracy", "## 2. Training", "## 3. Sampling",
                    "## 4. FP8", "total time"):
        assert heading in out
    # bf16 against fp32: a real difference, within bf16 tolerance.
    logit_err = float(out.split("max |logit error| / max |logit|: ")[1].split()[0])
    assert 0 < logit_err < 5e-2
    assert "| 1 |" in out and "| 8 |" in out  # both sampling batch sizes
