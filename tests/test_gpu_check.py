"""benchmarks/gpu_check.py runs end to end on CPU with --tiny and prints every section."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_gpu_check_tiny_prints_the_whole_report(capsys):
    from benchmarks import gpu_check

    gpu_check.main(["--tiny"])
    out = capsys.readouterr().out
    for heading in ("# E2D2 GPU check", "## 1. Accuracy", "## 2. Training", "## 3. Sampling",
                    "## 4. FP8", "## 5. Training through the megatron engine", "total time"):
        assert heading in out
    assert "FAILED" not in out, out
    # bf16 against fp32: a real difference, within bf16 tolerance.
    logit_err = float(out.split("max |logit error| / max |logit|: ")[1].split()[0])
    assert 0 < logit_err < 5e-2
    assert "| 1 |" in out and "| 8 |" in out  # both sampling batch sizes
    engine = out.split("## 5. Training through the megatron engine")[1]
    row = engine.split("| --- | --- | --- |\n")[1].splitlines()[0]
    assert float(row.split("|")[1].replace(",", "")) > 0  # the run's tokens/s


def test_a_failing_section_is_reported_and_the_others_still_run(capsys, monkeypatch):
    from benchmarks import gpu_check

    def broken(plan, device):
        raise RuntimeError("no kernel image is available")

    monkeypatch.setattr(gpu_check, "accuracy", broken)
    monkeypatch.setattr(gpu_check, "training", lambda *args: ["## 2. Training", "stand-in section"])
    monkeypatch.setattr(gpu_check, "sampling", lambda *args: ["## 3. Sampling", "stand-in section"])
    monkeypatch.setattr(gpu_check, "engine", lambda *args: ["## 5. Training", "stand-in section"])
    gpu_check.main(["--tiny"])
    out = capsys.readouterr().out
    (accuracy,) = [block for block in out.split("\n\n") if block.startswith("## 1. Accuracy")]
    assert "FAILED:" in accuracy and "RuntimeError: no kernel image is available" in accuracy
    assert out.count("stand-in section") == 3 and "## 4. FP8" in out and "total time" in out


def test_sections_picks_what_runs_and_refuses_unknown_numbers(capsys, monkeypatch):
    from benchmarks import gpu_check

    monkeypatch.setattr(gpu_check, "sampling", lambda *args: ["## 3. Sampling", "stand-in section"])
    gpu_check.main(["--tiny", "--sections", "4,3"])
    out = capsys.readouterr().out
    assert out.index("## 3. Sampling") < out.index("## 4. FP8")  # in section order
    assert "## 1. Accuracy" not in out and "## 5." not in out and "total time" in out
    with pytest.raises(SystemExit):
        gpu_check.main(["--tiny", "--sections", "6"])
    assert "give section numbers from (1, 2, 3, 4, 5)" in capsys.readouterr().err
