"""ParallelConfig / PipelinePlan: invalid layouts fail with one clear ConfigError, before any
process group exists; valid ones place encoder layers before decoder layers."""

from __future__ import annotations

import pytest
import torch

from e2d2.config import ModelConfig
from e2d2.errors import ConfigError
from megatron_ext import layout
from megatron_ext.layout import ParallelConfig, PipelinePlan, balanced_encoder_stages

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
        (dict(world_size=1, fp8_recipe="nonsense"), "unknown fp8 recipe"),
        (dict(world_size=1, precision="fp16"), "unknown precision 'fp16'"),
        (dict(world_size=1, recompute="some"), "unknown recompute 'some'"),
        (dict(world_size=2, overlap_param_gather=True), "needs use_distributed_optimizer"),
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
        ParallelConfig(world_size=1, precision="fp8")


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
    (dict(precision="fp8", fp8_format="e5m2"), "unknown fp8_format 'e5m2'"),
    (dict(precision="fp8", transformer_impl="local"), "local layers have no FP8 path"),
])
def test_invalid_implementation(monkeypatch, kwargs, message):
    monkeypatch.setattr(layout, "transformer_engine_available", lambda: True)
    with pytest.raises(ConfigError, match=message):
        ParallelConfig(world_size=1, **kwargs)


def test_implementation_defaults_to_local_and_fp8_implies_transformer_engine(monkeypatch):
    assert ParallelConfig(world_size=1).transformer_impl == "local"
    monkeypatch.setattr(layout, "transformer_engine_available", lambda: True)
    parallel = ParallelConfig(world_size=1, precision="fp8", fp8_recipe="tensorwise")
    assert parallel.transformer_impl == "transformer_engine"
    assert parallel.name == "tp1-pp1-dp1-te-fp8-tensorwise-hybrid"
    PipelinePlan(E2D2, parallel)  # the plan no longer refuses FP8


def test_transformer_config_carries_fp8(monkeypatch):
    from megatron_ext.model import transformer_config

    monkeypatch.setattr(layout, "transformer_engine_available", lambda: True)
    config = transformer_config(E2D2, ParallelConfig(world_size=1, precision="fp8",
                                                     fp8_format="e4m3"))
    assert (config.transformer_impl, config.fp8, config.fp8_recipe) == (
        "transformer_engine", "e4m3", "delayed")
    assert (config.bf16, config.params_dtype) == (True, torch.bfloat16)  # FP8 is bf16 + FP8 GEMMs
    local = transformer_config(E2D2, ParallelConfig(world_size=1, fp8_recipe="tensorwise"))
    assert (local.transformer_impl, local.fp8, local.bf16) == ("local", None, False)


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


# ------------------------------------------------------------------ balanced placement
def _one_b():
    from launchers.config import load_run_config

    return load_run_config("configs/h100-1b-e2d2.yaml").model


def _all_placements(total: int, stages: int):
    """Every split of ``total`` layers over ``stages`` contiguous stages, each >= 1."""
    if stages == 1:
        yield (total,)
        return
    for first in range(1, total - stages + 2):
        for rest in _all_placements(total - first, stages - 1):
            yield (first, *rest)


def test_stage_flops_add_up_to_the_model_and_match_the_issue_numbers():
    from e2d2.flops import forward_flops_per_sequence

    cfg = _one_b()
    plan = PipelinePlan(cfg, ParallelConfig(world_size=2, pipeline_parallel=2,
                                            encoder_pipeline_stages=1))
    per_stage = plan.stage_flops()
    assert sum(per_stage) == pytest.approx(forward_flops_per_sequence(cfg).masked, rel=1e-12)
    # Issue 12's hand count: 24 encoder layers ~ 5.35 TF, 4 decoder layers + head ~ 2.23 TF.
    assert per_stage == pytest.approx([5.35e12, 2.23e12], rel=0.01)
    assert plan.imbalance() > 1.4  # one encoder stage cannot balance PP2
    assert plan.describe_shares().startswith("stage 0 70.6%, stage 1 29.4% (max/mean 1.41)")


@pytest.mark.parametrize("pp, k", [(2, 1), (3, 1), (3, 2), (4, 2), (4, 3)])
def test_default_placement_is_the_best_possible(pp, k):
    """The default equals the minimum imbalance over every placement that keeps the
    encoder/decoder boundary (built through the pipeline_layers override)."""
    cfg = _one_b()
    base = dict(world_size=pp, pipeline_parallel=pp, encoder_pipeline_stages=k)
    default = PipelinePlan(cfg, ParallelConfig(**base)).imbalance()
    best = min(
        PipelinePlan(cfg, ParallelConfig(**base, pipeline_layers=enc + dec)).imbalance()
        for enc in _all_placements(cfg.num_layers, k)
        for dec in _all_placements(cfg.num_decoder_layers, pp - k))
    assert default == pytest.approx(best, rel=1e-12)


def test_one_b_balances_within_15_percent_where_the_layer_counts_allow():
    """1B (24 + 4 layers, a 1.27 TF LM head): of PP 2..8, only three stages with two encoder
    stages reach <= 1.15; PP4 with three encoder stages comes closest otherwise (1.18)."""
    cfg = _one_b()
    plan = PipelinePlan(cfg, ParallelConfig(world_size=6, tensor_parallel=2, pipeline_parallel=3,
                                            encoder_pipeline_stages=2))
    assert plan.layer_counts() == [12, 12, 4]
    assert plan.imbalance() <= 1.15
    assert [(list(s.encoder), list(s.decoder)) for s in plan.stages()] == [
        (list(range(12)), []), (list(range(12, 24)), []), ([], [0, 1, 2, 3])]
    interleaved = PipelinePlan(cfg, ParallelConfig(world_size=2, pipeline_parallel=2,
                                                   virtual_pipeline=2, encoder_pipeline_stages=3))
    assert interleaved.layer_counts() == [8, 8, 8, 4]
    assert interleaved.imbalance() == pytest.approx(1.178, abs=1e-3)


def test_the_start_up_shares_suggest_a_clearly_better_encoder_split():
    """PP3 with one encoder stage leaves 24 encoder layers on stage 0 (max/mean 2.12); the
    shares say that two encoder stages would predict 1.06 (the best of every split, found by
    trying them all), and say nothing where the split is already the best or no other exists."""
    cfg = _one_b()

    def plan(pp, k, **kw):
        return PipelinePlan(cfg, ParallelConfig(world_size=pp, pipeline_parallel=pp,
                                                encoder_pipeline_stages=k, **kw))

    assert plan(3, 1).describe_shares().endswith(
        "(max/mean 2.12); parallel.encoder_pipeline_stages=2 predicts max/mean 1.06 on the same "
        "pipeline")
    best = min(range(1, 4), key=lambda k: plan(4, k).imbalance())
    assert f"encoder_pipeline_stages={best} predicts" in plan(4, 1).describe_shares()
    for pp, k in [(3, 2), (2, 1)]:  # already the best split; the only split
        assert "predicts" not in plan(pp, k).describe_shares()
    # a user's own placement is left alone
    assert "predicts" not in plan(3, 1, pipeline_layers=[24, 2, 2]).describe_shares()
    with pytest.raises(ConfigError, match=r"in 1\.\.2 or auto; 2 balances the stages best \(predicted "
                                          r"max/mean 1\.06\)"):
        PipelinePlan(cfg, ParallelConfig(world_size=3, pipeline_parallel=3))


def test_balanced_placement_moves_layers_off_the_head_stage():
    plan = PipelinePlan(BD3.replace(num_layers=6, vocab_size=4096, mask_token_id=4095),
                        ParallelConfig(world_size=2, pipeline_parallel=2))
    assert plan.layer_counts() == [4, 2]  # even split would be [3, 3] + the head


def test_pipeline_layers_override():
    parallel = ParallelConfig(world_size=3, pipeline_parallel=3, encoder_pipeline_stages=2,
                              pipeline_layers=[1, 2, 2])
    plan = PipelinePlan(E2D2, parallel)
    assert [list(s.encoder) for s in plan.stages()] == [[0], [1, 2], []]
    assert [list(s.decoder) for s in plan.stages()] == [[], [], [0, 1]]
    assert parallel.name == "tp1-pp3-dp1-enc2-layers1x2x2"


@pytest.mark.parametrize("model, kwargs, message", [
    (E2D2, dict(world_size=1, pipeline_layers=[3]), "only applies with pipeline_parallel > 1"),
    (E2D2, dict(world_size=2, pipeline_parallel=2, encoder_pipeline_stages=1,
                pipeline_layers=[3]), "must give 2 counts"),
    (E2D2, dict(world_size=2, pipeline_parallel=2, encoder_pipeline_stages=1,
                pipeline_layers=[5, 0]), "each >= 1"),
    # 4 + 1 layers in total, but 4 of them cannot be encoder layers: the boundary holds.
    (E2D2, dict(world_size=2, pipeline_parallel=2, encoder_pipeline_stages=1,
                pipeline_layers=[4, 1]), r"puts 4 layers on the encoder stages \(stages 0..0\) "
                                         "but the model has 3"),
    (BD3, dict(world_size=2, pipeline_parallel=2, pipeline_layers=[1, 1]),
     "puts 2 layers on the main stages but the model has 3"),
])
def test_invalid_pipeline_layers(model, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        PipelinePlan(model, ParallelConfig(**kwargs))


def test_pipeline_layers_from_a_run_config():
    from launchers.config import load_run_config

    cfg = load_run_config("configs/h100-1b-e2d2.yaml", ["parallel.pipeline_parallel=3",
                                                         "parallel.encoder_pipeline_stages=2",
                                                         "parallel.pipeline_layers=[10, 14, 4]",
                                                         "train.precision=bf16"])  # no TE here
    parallel = cfg.parallel.engine(6, cfg.train.precision, cfg.model)
    assert PipelinePlan(cfg.model, parallel).layer_counts() == [10, 14, 4]


@pytest.mark.parametrize("value", [None, "auto", 0, 1, 3])
def test_one_config_runs_at_every_layout(value, capsys):
    """A PP2 config resumed at PP1 (TP2): any encoder_pipeline_stages is ignored there, with
    a note for an explicit value; null and auto are the FLOPs-balanced split at PP > 1."""
    from launchers.config import load_run_config

    overrides = ["train.precision=bf16", f"parallel.encoder_pipeline_stages={value}"
                 if value is not None else "parallel.encoder_pipeline_stages=null"]
    cfg = load_run_config("configs/h100-1b-e2d2.yaml", [*overrides, "parallel.pipeline_parallel=1"])
    parallel = cfg.parallel.engine(2, cfg.train.precision, cfg.model)
    assert parallel.encoder_pipeline_stages is None
    PipelinePlan(cfg.model, parallel)
    err = capsys.readouterr().err
    assert ("ignored" in err) == isinstance(value, int)
    cfg = load_run_config("configs/h100-1b-e2d2.yaml", [*overrides, "parallel.pipeline_parallel=3"])
    if value in (None, "auto"):
        parallel = cfg.parallel.engine(6, cfg.train.precision, cfg.model)
        assert parallel.encoder_pipeline_stages == balanced_encoder_stages(cfg.model, parallel)[0]
    elif value in (0, 3):  # explicit and not in 1..2: one error naming the valid ones and auto
        with pytest.raises(ConfigError, match=r"must be in 1\.\.2 .*or auto"):
            cfg.parallel.engine(6, cfg.train.precision, cfg.model)
    else:
        assert cfg.parallel.engine(6, cfg.train.precision, cfg.model).encoder_pipeline_stages == 1


def test_shipped_configs_leave_the_split_to_auto():
    from launchers.config import load_run_config

    for path in ("configs/tiny-cpu.yaml", "configs/h100-1b-e2d2.yaml"):
        assert load_run_config(path, ["train.precision=bf16"]).parallel.encoder_pipeline_stages == "auto"
