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
    assert [p.point for p in spec.points] == ["dec1-bs4", "dec1-bs8", "dec2-bs4", "dec2-bs8"]
    assert [p.name for p in spec.points] == [f"{p.point}-seed0" for p in spec.points]
    assert [p.index for p in spec.points] == [0, 1, 2, 3]
    base = TINY
    for point in spec.points:
        cfg = point.config
        assert cfg.model.num_decoder_layers == point.values["decoder_layers"]
        assert cfg.model.block_size == point.values["block_size"]
        assert cfg.train.steps == 100  # the spec's override
        assert cfg.model.hidden_size == base["model"]["hidden_size"]  # the base, untouched
        assert point.run_dir == tmp_path / "out" / "points" / point.name


def test_seeds_run_every_point_n_times_in_separate_run_directories(tmp_path):
    spec = load_spec(write_spec(tmp_path, grid={"decoder_layers": [1, 2]}, seeds=3,
                                overrides=["train.steps=100", "run.seed=10"]))
    assert [(p.point, p.seed, p.config.run.seed) for p in spec.points] == [
        ("dec1", 0, 10), ("dec1", 1, 11), ("dec1", 2, 12),
        ("dec2", 0, 10), ("dec2", 1, 11), ("dec2", 2, 12)]
    assert len({p.run_dir for p in spec.points}) == 6
    assert [p.index for p in spec.points] == list(range(6))


def test_train_flops_become_steps_and_baselines_train_at_each_budget(tmp_path):
    from e2d2 import flops

    spec = load_spec(write_spec(tmp_path, grid={"decoder_layers": [1, 4],
                                                "train_flops": ["2.0e11"]},  # YAML 1.1: a str
                                baselines={"bd3lm": ["model.variant=bd3lm",
                                                     "model.num_decoder_layers=0"]},
                                sampling_tokens="1.0e9"))
    assert [p.name for p in spec.points] == ["dec1-fl2e11-seed0", "dec4-fl2e11-seed0",
                                             "bd3lm-fl2e11-seed0"]
    for point in spec.points:
        cfg = point.config
        per_step = flops.training_flops_per_token(cfg.model).masked * cfg.train.batch_size \
            * cfg.model.seq_length
        assert abs(cfg.train.steps * per_step - 2e11) <= per_step / 2  # the nearest step
    assert spec.points[0].config.train.steps > spec.points[1].config.train.steps
    baseline = spec.points[2]
    assert baseline.baseline == "bd3lm" and baseline.config.model.variant == "bd3lm"
    assert "decoder_layers" not in baseline.values and spec.sampling_tokens == 1e9


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
    ({"seeds": 0}, "seeds: 0 is not a positive integer"),
    ({"sampling_tokens": -1}, "sampling_tokens=-1 must be a number >= 0"),
    ({"baselines": {"bd3lm": "model.variant=bd3lm"}}, "[baselines]: expected name: ["),
    ({"grid": {"decoder_layers": [1], "train_tokens": [4096], "train_flops": [1e12]}},
     "train_tokens and train_flops both set train.steps"),
    ({"grid": {"decoder_layers": [1], "train_flops": [1000]}}, "is less than one step"),
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


def test_the_shipped_example_specs_are_valid():
    spec = load_spec(ROOT / "configs" / "sweeps" / "decoder-depth-tiny.yaml")
    assert [p.values["decoder_layers"] for p in spec.points] == [1, 2, 4]
    kjv = load_spec(ROOT / "configs" / "sweeps" / "decoder-depth-kjv.yaml")
    assert kjv.seeds == 2 and len(kjv.points) == (6 + 1) * 3 * 2
    evals = load_spec(ROOT / "configs" / "sweeps" / "decoder-depth-eval-tiny.yaml").evals
    assert [c.metric for c in evals.corpora] == ["kjv_held_nelbo"]
    assert evals.tasks == ("kjv_cloze",)


def test_jobs_needs_local(tmp_path, capsys):
    path = write_spec(tmp_path)
    assert main(["sweep", "submit", str(path), "--jobs", "2"]) == 2
    assert "--jobs 2: give a number >= 1, with --local" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_spec_passes_sbatch_resources_and_the_config_environment_to_its_jobs(tmp_path):
    from launchers.sweep.submit import _point_scripts

    spec = load_spec(write_spec(tmp_path, overrides=["train.steps=100",
                                                     "parallel.overlap_grad_reduce=true"],
                                slurm={"gpus_per_node": 0, "mem": "64G",
                                       "setup": "module load cuda"}))
    (script, array), = _point_scripts(spec, list(spec.points))
    assert array == "0,1,2"
    assert "#SBATCH --mem=64G" in script
    assert "module load cuda" in script
    assert "export CUDA_DEVICE_MAX_CONNECTIONS=1" in script


def test_the_collect_job_gets_what_its_evaluations_need(tmp_path):
    import shlex

    from launchers.sweep.submit import _collect_options

    plain = _collect_options(load_spec(write_spec(tmp_path)), [])
    assert "--time=01:00:00" in plain and not any(o.startswith("--gpus") for o in plain)
    assert plain[-1].startswith("--wrap=") and "bash" not in plain[-1]
    spec = load_spec(write_spec(tmp_path, eval={"tasks": ["kjv_cloze"], "nproc_per_node": 2},
                                slurm={"gpus_per_node": 8, "time": "04:00:00",
                                       "setup": "module load cuda"}))
    options = _collect_options(spec, [])
    assert "--time=04:00:00" in options and "--gpus-per-node=2" in options
    bash, flag, script = shlex.split(options[-1].removeprefix("--wrap="))
    assert (bash, flag) == ("bash", "-c")
    *_, setup, collect = script.splitlines()
    assert setup.startswith("module load cuda || {") and collect.endswith(f"collect {spec.path}")


def test_the_eval_section_becomes_corpora_tasks_and_their_arguments(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # corpus data is relative to the cwd, as data.path
    spec = load_spec(write_spec(tmp_path, eval={
        "corpora": {"kjv-valid": {"data": "data/kjv", "draws": 2},
                    "wiki": {"data": ["a.jsonl", "b.jsonl"], "convention": "document",
                             "max_sequences": 64}},
        "tasks": ["kjv_cloze"], "task_args": {"mc_draws": 4, "limit": 200, "num_fewshot": 0},
        "overrides": ["parallel.pipeline_parallel=1"]}))
    kjv, wiki = spec.evals.corpora
    assert (kjv.metric, kjv.data, kjv.split, kjv.draws) == (
        "kjv-valid_nelbo", (str(tmp_path / "data" / "kjv"),), "valid", 2)
    assert wiki.data == (str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"))
    assert (wiki.convention, wiki.max_sequences, wiki.draws) == ("document", 64, None)
    assert spec.evals.tasks == ("kjv_cloze",)
    assert dict(spec.evals.task_args) == {"mc_draws": 4, "limit": 200, "num_fewshot": 0}
    assert spec.evals.overrides == ("parallel.pipeline_parallel=1",) and not spec.evals.ema
    assert not load_spec(write_spec(tmp_path)).evals.corpora  # no eval section: nothing


@pytest.mark.parametrize("section, fragment", [
    ({"corpus": {}}, "[eval]: unknown key(s) ['corpus']"),
    ({"corpora": {"kjv": {"path": "x"}}}, "[eval.corpora.kjv]: expected a mapping with data"),
    ({"corpora": {"kjv": {"data": "x", "drawz": 2}}}, "[eval.corpora.kjv]: unknown key(s) "
                                                      "['drawz']"),
    ({"corpora": {"kjv": {"data": "x", "split": "test"}}}, "split='test'; choose one of"),
    ({"corpora": {"kjv": {"data": "x", "draws": 0}}}, "draws: 0 is not a positive integer"),
    ({"corpora": {"a b": {"data": "x"}}}, "a corpus name is letters, digits"),
    ({"tasks": "kjv_cloze,kjv_lastword"}, "[eval.tasks]: expected a list of lm-eval task"),
    ({"task_args": {"mc_draw": 4}}, "[eval.task_args]: unknown key(s) ['mc_draw']"),
    ({"task_args": {"limit": -1}}, "limit: -1 is not a positive integer"),
    ({"ema": "yes"}, "ema='yes'; expected true or false"),
])
def test_a_bad_eval_section_is_one_clear_error(tmp_path, section, fragment):
    with pytest.raises(ConfigError) as info:
        load_spec(write_spec(tmp_path, eval=section))
    assert fragment in str(info.value)
