"""Sweep specs: a grid becomes fully validated run configs; bad specs fail before anything runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pretrain_helpers import TINY, write_config

from e2d2.errors import ConfigError
from launchers.cli import main
from launchers.sweep.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]


def write_spec(tmp_path: Path, **fields) -> Path:
    """A spec over the tiny config (its data directory is not read until submit)."""
    base = write_config(tmp_path / "base.yaml", data={"path": str(tmp_path / "data")})
    spec = {"base": str(base), "output": str(tmp_path / "out"),
            "overrides": ["train.steps=100"], "grid": {"decoder_layers": [1, 2, 4]},
            "slurm": {"gpus_per_node": 0}} | fields
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_points_are_the_grid_cross_product_as_full_configs(tmp_path):
    spec = load_spec(write_spec(tmp_path, grid={"decoder_layers": [1, 2],
                                                "block_size": [4, 8]}))
    assert [p.name for p in spec.points] == ["dec1-bs4", "dec1-bs8", "dec2-bs4", "dec2-bs8"]
    assert [p.index for p in spec.points] == [0, 1, 2, 3]
    base = TINY
    for point in spec.points:
        cfg = point.config
        assert cfg.model.num_decoder_layers == point.values["decoder_layers"]
        assert cfg.model.block_size == point.values["block_size"]
        assert cfg.train.steps == 100  # the spec's override
        assert cfg.model.hidden_size == base["model"]["hidden_size"]  # the base, untouched
        assert point.run_dir == tmp_path / "out" / "points" / point.name


def test_train_tokens_become_steps(tmp_path):
    base = TINY
    per_step = base["train"]["batch_size"] * base["model"]["seq_length"]
    spec = load_spec(write_spec(tmp_path, grid={"decoder_layers": [1],
                                                "train_tokens": [per_step * 100]}))
    assert spec.points[0].config.train.steps == 100


@pytest.mark.parametrize("fields, fragment", [
    ({"gird": {"decoder_layers": [1]}}, "unknown key(s) ['gird']"),
    ({"grid": {}}, "the grid is empty"),
    ({"grid": {"decoder_layers": []}}, "decoder_layers is an empty list"),
    ({"grid": {"encoder_layers": [2, 4]}}, "decoder_layers is required"),
    ({"grid": {"decoder_layers": [1], "depth": [3]}}, "[grid]: unknown key(s) ['depth']"),
    ({"grid": {"decoder_layers": [1, 1.5]}}, "1.5 is not a positive integer"),
    ({"slurm": {"gpus": 8}}, "[slurm]: unknown key(s) ['gpus']"),
    ({"grid": {"decoder_layers": [1, 2], "hidden_size": [128, 130]}},
     "point dec1-h130 (decoder_layers=1, hidden_size=130) is invalid: "),
    ({"grid": {"decoder_layers": [1], "train_tokens": [1000]}},
     "train_tokens=1000 is not a whole number of steps"),
    ({"overrides": ["train.stepz=3"]}, "unknown key 'stepz' in [train]"),
    ({"overrides": {"train.steps": 3}}, "expected a list of section.key=value strings"),
    ({"slurm": {"gpus_per_node": 0, "tasks_per_node": 3}, "overrides": [
        "parallel.pipeline_parallel=2", "parallel.encoder_pipeline_stages=1"]},
     "point dec1 (decoder_layers=1) is invalid: "),
])
def test_bad_specs_are_one_clear_error(tmp_path, fields, fragment):
    with pytest.raises(ConfigError) as info:
        load_spec(write_spec(tmp_path, **fields))
    assert fragment in str(info.value)


def test_an_invalid_point_names_its_config_error(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_spec(write_spec(tmp_path, grid={"decoder_layers": [1], "hidden_size": [130]}))
    assert "hidden_size=130 is not divisible by num_attention_heads=4" in str(info.value)


def test_the_cli_refuses_a_bad_spec_before_writing_anything(tmp_path, capsys):
    path = write_spec(tmp_path, grid={"decoder_layers": [1], "hidden_size": [130]})
    assert main(["sweep", "submit", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "point dec1-h130" in err
    assert not (tmp_path / "out").exists()


def test_the_shipped_example_spec_is_valid():
    spec = load_spec(ROOT / "configs" / "sweeps" / "decoder-depth-tiny.yaml")
    assert [p.values["decoder_layers"] for p in spec.points] == [1, 2, 4]
