"""Every shipped YAML config loads and validates; bad files fail with one message naming the fix."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from e2d2.errors import ConfigError
from launchers.config import load_run_config, run_config_from_dict

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_validates(path):
    cfg = load_run_config(path)
    assert cfg.model.seq_length % cfg.model.block_size == 0
    from megatron_ext.layout import PipelinePlan

    # FP8 needs TE: checked separately, so bf16 here
    section = dataclasses.replace(cfg.parallel, transformer_impl=None)
    precision = "bf16" if cfg.train.precision == "fp8" else cfg.train.precision
    PipelinePlan(cfg.model, section.engine(cfg.parallel.model_parallel, precision, cfg.model))
    dp = 2
    assert cfg.train.batch_size % ((cfg.train.micro_batch_size or 1) * dp) == 0


def test_roundtrip_through_dict():
    cfg = load_run_config(CONFIGS[0])
    assert run_config_from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("data,match", [
    ({"modle": {}}, "unknown section"),
    ({"model": {"hidden": 3}}, r"\[model\]: unknown key"),
    ({"model": {"seq_length": 130, "block_size": 4}}, r"\[model\]: seq_length=130 is not a multiple"),
    ({"parallel": {"tp": 2}}, r"\[parallel\]: unknown key"),
    ({"checkpoint": {"interval": 0}}, r"\[checkpoint\]: checkpoint.interval must be positive"),
    ({"train": {"lr_decay": "exp"}}, r"\[train\]: unknown lr_decay"),
    ({"train": {"precision": "fp16"}}, r"\[train\]: unknown precision 'fp16'"),
    ({"parallel": {"fp8": "tensorwise"}}, r"parallel.fp8 was replaced by train.precision: fp8 "
                                          "with parallel.fp8_recipe"),
    ([1, 2], "expected a mapping"),
    ({"train": {"steps": "abc"}}, r"\[train\]: steps='abc' must be a whole number"),
    ({"train": {"steps": 2.5}}, r"\[train\]: steps=2.5 must be a whole number"),
    ({"train": {"lr": "fast"}}, r"\[train\]: lr='fast' must be a number"),
    ({"model": {"qk_layernorm": "maybe"}}, r"\[model\]: qk_layernorm='maybe' must be true or false"),
    ({"model": {"head_dim": "wide"}}, r"\[model\]: head_dim='wide' must be a whole number"),
    ({"run": {"dir": 2024}}, r"\[run\]: dir=2024 must be a string"),
])
def test_bad_config_is_one_clear_error(data, match):
    with pytest.raises(ConfigError, match=match):
        run_config_from_dict(data, "x.yaml")


def test_numbers_as_yaml_1_1_writes_them_load_as_numbers(tmp_path):
    """PyYAML reads ``3e-4`` (no dot) as a string: in a file and in an override it is the number."""
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 3e-4\n  steps: 1e5\n  micro_batch_size: null\nmodel:\n  rope_theta: 1e6\n")
    cfg = load_run_config(path, ["train.weight_decay=1e-5", "train.warmup_steps=2e3"])
    assert (cfg.train.lr, cfg.train.steps, cfg.train.micro_batch_size) == (3e-4, 100_000, None)
    assert (cfg.train.weight_decay, cfg.train.warmup_steps, cfg.model.rope_theta) == (1e-5, 2000, 1e6)
    assert type(cfg.train.steps) is int and type(cfg.train.lr) is float


def test_resolved_config_of_a_run_from_before_train_precision_still_loads():
    cfg = run_config_from_dict({"parallel": {"fp8": None, "tensor_parallel": 2}})
    assert (cfg.parallel.tensor_parallel, cfg.train.precision) == (2, "fp32")


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_run_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_run_config(bad)



def test_owt_baselines_have_equal_total_layers():
    configs = {p.stem: load_run_config(p) for p in CONFIGS if p.stem.startswith("owt-")}
    assert sorted(configs) == ["owt-ar", "owt-bd3lm", "owt-e2d2", "owt-mdlm"]
    totals = {name: c.model.num_layers + c.model.num_decoder_layers for name, c in configs.items()}
    assert set(totals.values()) == {28}, totals
