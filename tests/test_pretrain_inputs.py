"""``e2d2 pretrain`` configuration and bad input: one clear error each, before any rank starts,
and nothing of an existing run is lost or overwritten."""

from __future__ import annotations

import json

import pytest
import yaml
from pretrain_helpers import make_data_dir, write_config

from e2d2.errors import ConfigError
from launchers.cli import main as e2d2_main
from launchers.config import load_run_config, override_keys, run_config_from_dict, save_run_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_data_dir(tmp_path_factory.mktemp("inputs"), documents=80)


def test_overrides_apply_and_are_validated(tmp_path):
    config = write_config(tmp_path / "c.yaml")
    cfg = load_run_config(config, ["train.steps=7", "parallel.tensor_parallel=2",
                                   "data.path=[a, b]", "data.weights=[0.3, 0.7]",
                                   "train.betas=[0.9, 0.95]", "run.dir=runs/x"])
    assert (cfg.train.steps, cfg.parallel.tensor_parallel, cfg.run.dir) == (7, 2, "runs/x")
    assert cfg.data.paths == ["a", "b"] and cfg.train.betas == (0.9, 0.95)
    with pytest.raises(ConfigError, match=r"unknown key 'step' in \[train\]; valid keys are .*'steps'"):
        load_run_config(config, ["train.step=7"])
    with pytest.raises(ConfigError, match=r"unknown section 'trian'; valid sections are"):
        load_run_config(config, ["trian.steps=7"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_run_config(config, ["steps=7"])
    with pytest.raises(ConfigError, match=r"\[train\]: micro_batch_size=9 must be in 1..batch_size=4"):
        load_run_config(config, ["train.micro_batch_size=9"])
    with pytest.raises(ConfigError, match="data.weights"):
        load_run_config(config, ["data.path=a", "data.weights=[1.0]"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_run_config(write_config(tmp_path / "c.yaml"), ["train.ema_decay=0.999"])
    save_run_config(cfg, tmp_path / "saved.yaml")
    assert load_run_config(tmp_path / "saved.yaml") == cfg
    assert run_config_from_dict(yaml.safe_load((tmp_path / "saved.yaml").read_text())) == cfg
    assert set(override_keys()) == {"model", "diffusion", "train", "sampler", "parallel", "run",
                                    "data", "checkpoint", "log"}


def _pretrain(*args) -> int:
    return e2d2_main(["pretrain", *map(str, args)])


def test_missing_unset_or_incomplete_data_is_one_clear_error(tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml")
    assert _pretrain(config, f"run.dir={tmp_path / 'r'}") == 2
    assert "data.path is not set" in capsys.readouterr().err
    assert _pretrain(config, f"run.dir={tmp_path / 'r'}", f"data.path={tmp_path / 'nope'}") == 2
    assert "does not exist; create it with `e2d2 data preprocess" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert _pretrain(config, f"run.dir={tmp_path / 'r'}", f"data.path={tmp_path / 'empty'}") == 2
    assert "not a complete `e2d2 data preprocess` output" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_a_tokenizer_that_does_not_fit_the_model_is_refused(tmp_path, data_dir, capsys):
    config = write_config(tmp_path / "c.yaml")
    assert _pretrain(config, f"run.dir={tmp_path / 'r'}", f"data.path={data_dir}",
                     "model.vocab_size=200", "model.mask_token_id=199") == 2
    err = capsys.readouterr().err
    assert "does not fit the model" in err and "set model.vocab_size=260" in err
    assert _pretrain(config, f"run.dir={tmp_path / 'r'}", f"data.path={data_dir}",
                     "model.mask_token_id=7") == 2
    assert "model.mask_token_id=259" in capsys.readouterr().err


def test_a_run_dir_of_another_config_or_with_checkpoints_is_not_overwritten(tmp_path, data_dir,
                                                                             capsys):
    config = write_config(tmp_path / "c.yaml")
    run_dir = tmp_path / "r"
    save_run_config(load_run_config(config, [f"run.dir={run_dir}", "model.hidden_size=64"]),
                    run_dir / "config.yaml")
    before = (run_dir / "config.yaml").read_text()
    assert _pretrain(config, f"run.dir={run_dir}", f"data.path={data_dir}") == 2
    err = capsys.readouterr().err
    assert "belongs to a different config (model.hidden_size: 64 -> 32)" in err
    assert (run_dir / "config.yaml").read_text() == before
    (run_dir / "checkpoints" / "iter_0000002").mkdir(parents=True)
    (run_dir / "checkpoints" / "latest").write_text("iter_0000002\n")
    assert _pretrain(config, f"run.dir={run_dir}", f"data.path={data_dir}", "--resume", "none") == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    assert _pretrain(config, f"run.dir={tmp_path / 'r2'}", f"data.path={data_dir}", "--resume",
                     tmp_path / "nowhere") == 2
    assert "is neither a checkpoint" in capsys.readouterr().err


def test_fault_injection_spec_is_validated(tmp_path, data_dir, capsys, monkeypatch):
    monkeypatch.setenv("E2D2_FAULTS", "nan@x")
    config = write_config(tmp_path / "c.yaml")
    assert _pretrain(config, f"run.dir={tmp_path / 'r'}", f"data.path={data_dir}") == 2
    assert "expected comma-separated nan@STEP" in capsys.readouterr().err


def test_empty_valid_split_is_refused(tmp_path, data_dir, capsys):
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(data_dir, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["valid"]["documents"] = 0
    (broken / "manifest.json").write_text(json.dumps(manifest))
    config = write_config(tmp_path / "c.yaml")
    assert _pretrain(config, f"run.dir={tmp_path / 'r'}", f"data.path={broken}") == 2
    assert "the valid split has no documents" in capsys.readouterr().err


@pytest.mark.parametrize("override,message", [
    ("checkpoint.init=/nonexistent/run", "/nonexistent/run is neither a checkpoint"),
    ("train.batch_size=4", "train.batch_size=4 must be a multiple of train.micro_batch_size x "
                           "data-parallel size = batch_size/DP x 3"),
])
def test_the_local_launcher_refuses_bad_input_once_before_any_rank_starts(
        override, message, tmp_path, data_dir, capsys):
    config = write_config(tmp_path / "c.yaml")
    assert _pretrain(config, f"run.dir={tmp_path / 'r'}", f"data.path={data_dir}", override,
                     "--nproc-per-node", 3) == 2
    err = capsys.readouterr().err
    assert err.count(message) == 1 and err.count("error:") == 1, err
    assert not (tmp_path / "r").exists()  # no rank ran
