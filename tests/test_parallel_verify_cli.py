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


@pytest.mark.parametrize("kwargs", [dict(micro_batch=0), dict(global_batch=3, micro_batch=2),
                                    dict(steps=0)])
def test_run_settings_validated(kwargs):
    from e2d2.errors import ConfigError

    with pytest.raises(ConfigError):
        verify.Run(**kwargs)


def _result(first_loss, params):
    return {"first_loss": first_loss, "losses": [1.0, 0.9], "grads": None, "params": params}


def test_compare_checks_final_weights_and_that_some_rank_has_a_loss():
    import torch

    reference = {"losses": [1.0, 0.9], "grads": {}, "params": {"w": torch.zeros(2)}}
    assert verify.compare(reference, [_result(1.0, {"w": torch.zeros(2)})], 1e-5, 1e-5) == []
    near = {"w": torch.tensor([0.0, 1e-6])}  # rounding carried through the steps: within PARAMS_ATOL
    assert verify.compare(reference, [_result(1.0, near)], 1e-5, 1e-5) == []
    off = verify.compare(reference, [_result(1.0, {"w": torch.tensor([0.0, 1e-4])})], 1e-5, 1e-5)
    assert off == ["rank 0: param w off by 1.00e-04"]
    none = verify.compare(reference, [_result(None, {"w": torch.zeros(2)})] * 2, 1e-5, 1e-5)
    assert none == ["no rank reported a loss"]
