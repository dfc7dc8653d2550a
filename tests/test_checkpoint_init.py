"""``checkpoint.init``: a checkpoint that does not match the model is refused, naming the
first missing, mis-shaped or unused tensor; ``checkpoint.init_strict=false`` loads what
matches, draws the rest at the seed and says how many of each; the log always says where
the initial weights came from."""

from __future__ import annotations

import pytest
import torch
from pretrain_helpers import TINY, make_data_dir, run_pretrain, write_config

from e2d2.config import ModelConfig
from e2d2.model import DiffusionLM
from launchers.hf.checkpoints import save_reference_weights, single_process_group
from megatron_ext.checkpoint import ModelMismatchError
from megatron_ext.engine import build_engine
from megatron_ext.groups import megatron_layout
from megatron_ext.layout import ParallelConfig
from megatron_ext.mapping import gather_reference_state, reference_state_at_seed

E2D2 = ModelConfig(**TINY["model"])


@pytest.fixture(scope="module")
def e2d2_checkpoint(tmp_path_factory):
    """An E2D2 checkpoint (weights of seed 7) and its reference state."""
    directory = tmp_path_factory.mktemp("init") / "e2d2"
    state = reference_state_at_seed(E2D2, 7)
    save_reference_weights(state, E2D2, directory)
    return directory, state


def initial_weights(cfg: ModelConfig, **options) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The full reference state ``build_engine`` starts ``cfg`` from, and what it logged."""
    lines: list[str] = []
    parallel = ParallelConfig(world_size=1)
    with single_process_group(), megatron_layout(parallel):
        stages, _ = build_engine(cfg, parallel, log=lines.append, **options)
        return gather_reference_state(stages), lines


def test_a_fresh_engine_logs_its_seed():
    state, lines = initial_weights(E2D2, seed=3)
    assert lines == ["initial weights: drawn at seed 3"]
    torch.testing.assert_close(state, reference_state_at_seed(E2D2, 3), rtol=0, atol=0)


def test_a_matching_checkpoint_loads_every_tensor(e2d2_checkpoint):
    directory, saved = e2d2_checkpoint
    state, lines = initial_weights(E2D2, init=directory)
    assert lines == [f"initial weights: checkpoint {directory} (all {len(saved)} tensors loaded)"]
    torch.testing.assert_close(state, saved, rtol=0, atol=0)


@pytest.mark.parametrize(("changes", "named"), [
    # BD3-LM holds a subset of E2D2's tensors: the decoder's would be dropped silently
    ({"variant": "bd3lm", "num_decoder_layers": 0},
     "it holds 'decoder_layers.0.attn.k_norm.weight', which this model has no place for"),
    ({"num_layers": 3}, "it has no tensor 'layers.2.input_norm.weight'"),
    ({"ffn_hidden_size": 48},
     "layers.0.mlp.gate_proj.weight has shape (64, 32) there, this model needs (48, 32)"),
])
def test_a_checkpoint_of_another_model_is_refused(e2d2_checkpoint, changes, named):
    directory, _ = e2d2_checkpoint
    with pytest.raises(ModelMismatchError, match="init_strict=false") as error:
        initial_weights(E2D2.replace(**changes), init=directory)
    assert named in str(error.value)


def test_not_strict_loads_what_matches_and_draws_the_rest(e2d2_checkpoint):
    directory, saved = e2d2_checkpoint
    cfg = E2D2.replace(num_layers=3)
    state, lines = initial_weights(cfg, init=directory, init_strict=False, seed=5)
    fresh = [name for name in state if name.startswith("layers.2.")]
    assert lines == [f"initial weights: checkpoint {directory}, not strict: {len(saved)} tensors "
                     f"loaded, 0 dropped, {len(fresh)} freshly initialised at seed 5 "
                     f"({', '.join(fresh[:3])}, ...)"]
    at_seed = reference_state_at_seed(cfg, 5)
    for name, tensor in state.items():
        torch.testing.assert_close(tensor, at_seed[name] if name in fresh else saved[name],
                                   rtol=0, atol=0, msg=name)


def test_not_strict_drops_what_the_model_has_no_place_for(e2d2_checkpoint):
    directory, saved = e2d2_checkpoint
    cfg = E2D2.replace(variant="bd3lm", num_decoder_layers=0)
    state, lines = initial_weights(cfg, init=directory, init_strict=False)
    dropped = sorted(set(saved) - set(state))
    assert dropped and all(n.startswith(("decoder_layers.", "encoder_norm.")) for n in dropped)
    assert f"{len(state)} tensors loaded, {len(dropped)} dropped" in lines[0]
    torch.testing.assert_close(state, {n: saved[n] for n in state}, rtol=0, atol=0)
    assert set(state) == set(DiffusionLM(cfg).state_dict())


@pytest.mark.slow
def test_pretrain_refuses_then_loads_with_init_strict_false(tmp_path, e2d2_checkpoint):
    """The issue's case end to end: a BD3-LM run from an E2D2 checkpoint."""
    directory, _ = e2d2_checkpoint
    config = write_config(tmp_path / "bd3lm.yaml", model={"variant": "bd3lm",
                                                          "num_decoder_layers": 0},
                          data={"path": str(make_data_dir(tmp_path))},
                          train={"steps": 1}, checkpoint={"interval": 1})
    run = ["run.dir=" + str(tmp_path / "run"), f"checkpoint.init={directory}"]
    refused = run_pretrain(config, *run)
    assert refused.returncode == 2, refused.stderr
    assert "decoder_layers.0.attn.k_norm.weight" in refused.stderr
    assert "Traceback" not in refused.stderr
    loaded = run_pretrain(config, *run, "checkpoint.init_strict=false")
    assert loaded.returncode == 0, loaded.stderr
    assert "initial weights: checkpoint" in loaded.stderr
    assert "dropped" in loaded.stderr
