"""Every shipped YAML config loads and validates; bad files fail with one message naming the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from e2d2.errors import ConfigError
from launchers.config import load_run_config, run_config_from_dict

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_validates(path):
    cfg = load_run_config(path)
    assert cfg.model.seq_length % cfg.model.block_size == 0
    from megatron_ext.layout import ParallelConfig, PipelinePlan

    par = {k: v for k, v in cfg.parallel.items() if k != "fp8"}  # FP8 needs TE: checked separately
    tp, pp = par.get("tensor_parallel", 1), par.get("pipeline_parallel", 1)
    PipelinePlan(cfg.model, ParallelConfig(world_size=tp * pp, **par))


def test_roundtrip_through_dict():
    cfg = load_run_config(CONFIGS[0])
    assert run_config_from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("data,match", [
    ({"modle": {}}, "unknown section"),
    ({"model": {"hidden": 3}}, r"\[model\]: unknown key"),
    ({"model": {"seq_length": 130, "block_size": 4}}, r"\[model\]: seq_length=130 is not a multiple"),
    ({"parallel": {"tp": 2}}, r"\[parallel\]: unknown key"),
    ([1, 2], "expected a mapping"),
])
def test_bad_config_is_one_clear_error(data, match):
    with pytest.raises(ConfigError, match=match):
        run_config_from_dict(data, "x.yaml")


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_run_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_run_config(bad)


def test_demo_default_equals_the_tiny_cpu_config():
    from launchers.demo import DEMO_CONFIG

    assert load_run_config(Path(__file__).parent.parent / "configs" / "tiny-cpu.yaml") == DEMO_CONFIG
