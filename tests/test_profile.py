"""`e2d2 profile`: DeepSpeed's per-module FLOPs beside e2d2.flops's, on the tiny config;
one clear message without DeepSpeed."""

from __future__ import annotations

import sys

import pytest
import torch

from e2d2 import flops
from e2d2.model import DiffusionLM
from launchers.cli import main
from launchers.config import load_run_config
from launchers.profiler import analytic_flops, profile

OVERRIDES = ["model.seq_length=32", "train.micro_batch_size=2"]
BATCH = 2


@pytest.fixture(scope="module")
def cfg():
    return load_run_config("configs/tiny-cpu.yaml", OVERRIDES)


def test_analytic_column_is_e2d2_flops(cfg):
    m = cfg.model
    with torch.device("meta"):
        names = [n for n, _ in DiffusionLM(m).named_modules()]
    got = analytic_flops(m, [*names, "lm_head"], BATCH)  # tied: the head is no module
    costs, modules = flops.layer_costs(m), flops.module_costs(m)
    assert got[""] == pytest.approx(BATCH * flops.forward_flops_per_sequence(m).dense, rel=1e-12)
    assert got["layers.0"] == pytest.approx(BATCH * costs.layer.dense, rel=1e-12)
    assert got["decoder_layers.1"] == pytest.approx(BATCH * costs.decoder_layer.dense, rel=1e-12)
    assert got["layers.0.attn"] == BATCH * modules.attention.dense
    assert got["decoder_layers.1.attn"] == BATCH * modules.decoder_attention.dense
    assert got["layers.0.mlp"] == BATCH * modules.mlp.dense
    assert got["lm_head"] == BATCH * costs.head.dense
    assert got["norm"] == 0


@pytest.mark.parametrize("model", ["reference", "engine"])
def test_table_has_the_attention_mlp_and_head_rows_and_deepspeed_agrees(cfg, model):
    pytest.importorskip("deepspeed")
    report = profile(cfg, model, steps=1, warmup=0)
    expected = analytic_flops(cfg.model, [r.name for r in report.rows], BATCH)
    for name in ("layers.0.attn", "layers.0.mlp", "decoder_layers.0.attn", "decoder_layers.0.mlp",
                 "lm_head", ""):
        row = report.row(name)
        assert row.analytic == expected[name]
        assert row.flops > 0 and abs(row.difference) <= 0.02, (name, row)
        assert not row.flagged
    h, d = cfg.model.hidden_size, cfg.model.kv_channels
    q, kv = cfg.model.num_attention_heads * d, cfg.model.num_query_groups * d
    assert report.row("layers.0.attn").params == 2 * h * q + 2 * h * kv + 2 * d  # q k v o, norms
    text = report.format()
    assert "layers.0.attn" in text and "lm_head" in text and "agree within 2%" in text


def test_a_module_off_by_more_than_two_percent_is_flagged():
    from launchers.profiler import ProfileReport, Row

    report = ProfileReport("t", [Row("a", 1, 103.0, 100.0, 0.1, 0.2), Row("b", 1, 101.0, 100.0, 0.1, None),
                                 Row("norm", 1, 5.0, 0.0, 0.1, None)])
    assert [r.flagged for r in report.rows] == [True, False, False]
    assert "differ by more than 2%: a" in report.format()


def test_without_deepspeed_one_message_says_how_to_install(monkeypatch, capsys):
    for name in [n for n in sys.modules if n.split(".")[0] == "deepspeed"] + ["deepspeed"]:
        monkeypatch.setitem(sys.modules, name, None)  # import deepspeed... -> ImportError
    code = main(["profile", "configs/tiny-cpu.yaml", *OVERRIDES])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("error:") == 1 and "pip install 'e2d2[profile]'" in err
