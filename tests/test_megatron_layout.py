"""ParallelConfig / PipelinePlan: invalid layouts fail with one clear ConfigError, before any
process group exists; valid ones place encoder layers before decoder layers."""

from __future__ import annotations

import pytest
import torch

from e2d2.config import ModelConfig
from e2d2.errors import ConfigError
from megatron_ext import layout
from megatron_ext.layout import ParallelConfig, PipelinePlan

E2D2 = ModelConfig(variant="e2d2", num_layers=3, num_decoder_layers=2,
                   num_attention_heads=4, num_query_groups=2)
BD3 = ModelConfig(variant="bd3lm", num_layers=3, num_decoder_layers=0)


@pytest.fixture(autouse=True)
def _no_process_group():
    yield
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(world_size=6, tensor_parallel=4), "world size 6 is not divisible"),
        (dict(world_size=4, pipeline_parallel=2, encoder_pipeline_stages=2), r"must be in 1\.\.1"),
        (dict(world_size=4, pipeline_parallel=2, encoder_pipeline_stages=0), r"must be in 1\.\.1"),
        (dict(world_size=2, sequence_parallel=True), "sequence_parallel needs tensor_parallel"),
        (dict(world_size=1, fp8="nonsense"), "unknown fp8 recipe"),
        (dict(world_size=2, pipeline_parallel=2, virtual_pipeline=1), "virtual_pipeline=1"),
        (dict(world_size=0), "world_size must be >= 1"),
    ],
)
def test_invalid_parallel_config(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ParallelConfig(**kwargs)


def test_fp8_without_transformer_engine_fails_clearly(monkeypatch):
    monkeypatch.setattr(layout, "transformer_engine_available", lambda: False)
    with pytest.raises(ConfigError, match="needs Transformer Engine.*never falls back"):
        ParallelConfig(world_size=1, fp8="delayed")


@pytest.mark.parametrize(
    "model, kwargs, message",
    [
        (E2D2, dict(world_size=8, tensor_parallel=8), "does not divide num_attention_heads=4"),
        (E2D2, dict(world_size=4, tensor_parallel=4), "does not divide num_query_groups=2"),
        (E2D2, dict(world_size=4, pipeline_parallel=4, encoder_pipeline_stages=1),
         "more pipeline stages than layers"),
        (E2D2.replace(num_layers=1), dict(world_size=3, pipeline_parallel=3,
                                          encoder_pipeline_stages=2),
         "more pipeline stages than layers"),
        (E2D2, dict(world_size=2, pipeline_parallel=2), "needs encoder_pipeline_stages"),
        (BD3, dict(world_size=4, pipeline_parallel=4), "more pipeline stages than layers"),
        (BD3, dict(world_size=2, pipeline_parallel=2, encoder_pipeline_stages=1),
         "only applies to E2D2"),
        (E2D2.replace(variant="e2d2_shared_kv"), dict(world_size=2, pipeline_parallel=2,
                                                      encoder_pipeline_stages=1),
         "use pipeline_parallel=1"),
    ],
)
def test_invalid_plan(model, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        PipelinePlan(model, ParallelConfig(**kwargs))


def test_e2d2_placement_encoder_then_decoder():
    plan = PipelinePlan(E2D2, ParallelConfig(world_size=4, pipeline_parallel=4,
                                             encoder_pipeline_stages=2))
    stages = plan.stages()
    assert [list(s.encoder) for s in stages] == [[0, 1], [2], [], []]
    assert [list(s.decoder) for s in stages] == [[], [], [0], [1]]
    assert [s.holds_embedding for s in stages] == [True, False, True, False]
    assert [s.holds_head for s in stages] == [False, False, False, True]
    assert [s.embeds_noisy for s in stages] == [False, False, True, False]
    assert plan.embedding_stages() == [0, 2, 3]  # tied head on the last stage
    assert plan.get_embedding_ranks([10, 11, 12, 13]) == [10, 12, 13]
    untied = PipelinePlan(E2D2.replace(tie_word_embeddings=False), plan.parallel)
    assert untied.embedding_stages() == [0, 2]


def test_single_stage_holds_everything():
    (stage,) = PipelinePlan(E2D2, ParallelConfig(world_size=2)).stages()
    assert list(stage.encoder) == [0, 1, 2] and list(stage.decoder) == [0, 1]
    assert stage.holds_embedding and stage.holds_head


def test_data_parallel_is_derived():
    parallel = ParallelConfig(world_size=8, tensor_parallel=2, pipeline_parallel=2,
                              encoder_pipeline_stages=1)
    assert parallel.data_parallel == 2
    assert parallel.name == "tp2-pp2-dp2-enc1"


def test_transformer_engine_without_it_fails_clearly(monkeypatch):
    monkeypatch.setattr(layout, "transformer_engine_available", lambda: False)
    with pytest.raises(ConfigError, match="transformer_impl='transformer_engine' needs "
                                          "Transformer Engine.*transformer_impl='local'"):
        ParallelConfig(world_size=1, transformer_impl="transformer_engine")


@pytest.mark.parametrize("kwargs, message", [
    (dict(transformer_impl="apex"), "unknown transformer_impl 'apex'"),
    (dict(fp8="delayed", fp8_format="e5m2"), "unknown fp8_format 'e5m2'"),
    (dict(fp8="delayed", transformer_impl="local"), "local layers have no FP8 path"),
])
def test_invalid_implementation(monkeypatch, kwargs, message):
    monkeypatch.setattr(layout, "transformer_engine_available", lambda: True)
    with pytest.raises(ConfigError, match=message):
        ParallelConfig(world_size=1, **kwargs)


def test_implementation_defaults_to_local_and_fp8_implies_transformer_engine(monkeypatch):
    assert ParallelConfig(world_size=1).transformer_impl == "local"
    monkeypatch.setattr(layout, "transformer_engine_available", lambda: True)
    parallel = ParallelConfig(world_size=1, fp8="tensorwise")
    assert parallel.transformer_impl == "transformer_engine"
    assert parallel.name == "tp1-pp1-dp1-te-fp8-tensorwise-hybrid"
    PipelinePlan(E2D2, parallel)  # the plan no longer refuses FP8


def test_transformer_config_carries_fp8(monkeypatch):
    from megatron_ext.model import transformer_config

    monkeypatch.setattr(layout, "transformer_engine_available", lambda: True)
    config = transformer_config(E2D2, ParallelConfig(world_size=1, fp8="delayed",
                                                     fp8_format="e4m3"))
    assert (config.transformer_impl, config.fp8, config.fp8_recipe) == (
        "transformer_engine", "e4m3", "delayed")
    local = transformer_config(E2D2, ParallelConfig(world_size=1))
    assert (local.transformer_impl, local.fp8) == ("local", None)


@pytest.mark.parametrize("model, kwargs, message", [
    (BD3.replace(seq_length=9, block_size=3),
     dict(world_size=2, tensor_parallel=2, sequence_parallel=True), "must divide seq_length=9"),
    (E2D2, dict(world_size=4, pipeline_parallel=2, virtual_pipeline=2, encoder_pipeline_stages=1),
     "3 decoder stages for num_decoder_layers=2"),
    (BD3, dict(world_size=2, pipeline_parallel=2, virtual_pipeline=2),
     "4 \\(virtual\\) pipeline stages for num_layers=3"),
])
def test_unsupported_model_features(model, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        PipelinePlan(model, ParallelConfig(**kwargs))


def test_interleaved_placement():
    plan = PipelinePlan(BD3.replace(num_layers=5),
                        ParallelConfig(world_size=2, pipeline_parallel=2, virtual_pipeline=2))
    assert [list(s.encoder) for s in plan.stages()] == [[0, 1], [2], [3], [4]]
    assert plan.embedding_stages() == [0, 3]
    assert plan.get_embedding_ranks([5, 6]) == [5, 6]


def test_vocab_must_split_evenly():
    with pytest.raises(ConfigError, match="does not divide vocab_size=259"):
        PipelinePlan(BD3.replace(vocab_size=259, mask_token_id=258),
                     ParallelConfig(world_size=2, tensor_parallel=2))


def test_e2d2_interleaved_embeds_both_streams_on_stage_zero():
    plan = PipelinePlan(E2D2, ParallelConfig(world_size=2, pipeline_parallel=2, virtual_pipeline=2,
                                             encoder_pipeline_stages=2))
    stages = plan.stages()
    assert [list(s.encoder) for s in stages] == [[0, 1], [2], [], []]
    assert [list(s.decoder) for s in stages] == [[], [], [0], [1]]
    assert [s.embeds_noisy for s in stages] == [True, False, False, False]
    # megatron's default group: first and last stage, i.e. chunk 0 of rank 0, last chunk of rank 1
    assert plan.embedding_stages() == [0, 3]
    assert plan.get_embedding_ranks([7, 8]) == [7, 8]
    with pytest.raises(ConfigError, match=r"must be in 1\.\.3"):
        ParallelConfig(world_size=2, pipeline_parallel=2, virtual_pipeline=2,
                       encoder_pipeline_stages=4)
