"""``python -m megatron_ext.verify``: a layout check for laptops."""

from __future__ import annotations

import pytest

from megatron_ext import verify


def test_invalid_layout_fails_before_any_process(capsys, monkeypatch):
    monkeypatch.setattr(verify, "spawn_gloo", lambda *a, **k: pytest.fail("spawned ranks"))
    assert verify.main(["--variant", "e2d2", "--world", "4", "--pp", "4",
                        "--encoder-stages", "1"]) == 2
    assert "more pipeline stages than layers" in capsys.readouterr().err


@pytest.mark.slow
def test_valid_layout_matches(capsys):
    assert verify.main(["--variant", "e2d2", "--world", "2", "--pp", "2",
                        "--encoder-stages", "1", "--prompt-and-padding"]) == 0
    assert "MATCH" in capsys.readouterr().out
