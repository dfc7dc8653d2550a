"""The parallel model equals the single-process reference model: loss, every parameter's
gradient, and three optimizer steps with clipping, under TP2, PP2 (one encoder + one decoder
stage), DP2, TP2xPP2, sequence parallelism, the interleaved schedule, the distributed
optimizer (also with PP > 1 and an embedding that straddles its DP shards); a TP2xPP2
checkpoint loads at TP1 and PP2; the parameter attributes megatron reads are those its own
GPTModel sets.

The comparison itself is ``megatron_ext.verify`` (also a command line for a single layout);
here the layouts are batched into one spawn per world size, because starting ranks
dominates the run time on 2 cores.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from e2d2.config import ModelConfig
from megatron_ext.groups import megatron_layout
from megatron_ext.layout import ParallelConfig, PipelinePlan
from megatron_ext.mapping import reference_state_at_seed
from megatron_ext.testing import spawn_gloo
from megatron_ext.verify import Run, compare, parallel_run, reference_run
from megatron_ext.verify import tiny_model_config as model_config

# Adam's first steps are ~lr * sign(grad), so rounding-level gradient differences grow
# to ~1e-6 in the losses after three steps, under any layout.
STEPS_ATOL = 1e-5
PLAIN, PROMPT_PAD = Run(), Run(prompt_and_padding=True)


def _micro2(run: Run) -> Run:
    """Two rows per micro-batch, for the sequence-parallel layouts: BD3-LM's predicted-half
    logits are a non-contiguous slice only with more than one row (megatron's CE ``.view``s
    them). The reference is unchanged: it takes the whole batch in one pass."""
    return dataclasses.replace(run, micro_batch=2)


def loaded_params(cfg: ModelConfig, parallel: ParallelConfig, directory: str) -> dict:
    """Full reference-named weights after loading ``directory`` under ``parallel``."""
    from megatron_ext import checkpoint
    from megatron_ext.mapping import gather_reference_state
    from megatron_ext.model import build_chunks

    plan = PipelinePlan(cfg, parallel)
    with megatron_layout(parallel, get_embedding_ranks=plan.get_embedding_ranks):
        stages = build_chunks(cfg, parallel)
        checkpoint.load(stages, directory)
        return gather_reference_state(stages)


CASES = {  # name: (model config, run)
    "e2d2": (model_config("e2d2"), PLAIN),
    "e2d2_prompt_pad": (model_config("e2d2"), PROMPT_PAD),
    # Untied: the embedding still has two copies (stage 0 for x0, stage 1 for xt), the head none.
    "e2d2_untied": (model_config("e2d2", tie_word_embeddings=False), PLAIN),
    "e2d2_shared_kv": (model_config("e2d2_shared_kv"), PLAIN),
    "e2d2_shared_kv_tied": (model_config("e2d2_shared_kv", tie_decoder_to_encoder=True), PLAIN),
    "bd3lm": (model_config("bd3lm"), PLAIN),
    "bd3lm_prompt_pad": (model_config("bd3lm"), PROMPT_PAD),
    "mdlm": (model_config("mdlm"), PLAIN),
    # Four layers so that PP2 x two interleaved chunks gives every virtual stage one layer.
    "bd3lm_4layers": (model_config("bd3lm", num_layers=4), PLAIN),
    "ar": (model_config("ar"), PROMPT_PAD),
}


def _world2(rank: int) -> dict:
    out = {}
    for case, (cfg, run) in CASES.items():
        layouts = [ParallelConfig(2, tensor_parallel=2), ParallelConfig(2)]
        if cfg.variant != "e2d2_shared_kv":  # one stage only (PipelinePlan says why)
            layouts.append(ParallelConfig(2, pipeline_parallel=2,
                                          encoder_pipeline_stages=1 if cfg.is_e2d2 else None))
        if case in ("e2d2_prompt_pad", "e2d2_shared_kv", "bd3lm", "ar"):
            layouts.append(ParallelConfig(2, tensor_parallel=2, sequence_parallel=True))
        if case in ("e2d2", "bd3lm_4layers"):  # megatron's interleaved 1F1B schedule
            layouts.append(ParallelConfig(2, pipeline_parallel=2, virtual_pipeline=2,
                                          encoder_pipeline_stages=2 if cfg.is_e2d2 else None))
        out[case] = {"reference": reference_run(cfg, run)}
        for parallel in layouts:
            layout_run = _micro2(run) if parallel.sequence_parallel else run
            out[case][parallel.name] = parallel_run(cfg, parallel, layout_run)
    return out


SAVED_LAYOUT = "tp2-pp2-dp1-enc1"
# A 1024-token vocabulary (a 32768-value embedding) straddles the distributed optimizer's DP
# shards, and 3 encoder + 1 decoder layers put the embedding copies at different offsets of
# their stages' grad buffers: the copies need their own DDP buckets (megatron's
# ``shared_embedding``) for the DP shards to line up. The default 64-token embedding lies in
# one shard on every stage, which hid it.
BIG_VOCAB = dict(vocab_size=1024, num_layers=3, num_decoder_layers=1)
PP2_DISTOPT = dict(pipeline_parallel=2, encoder_pipeline_stages=1, use_distributed_optimizer=True)
WORLD4 = {  # name: (model config, layouts)
    "e2d2": (model_config("e2d2"), [
        ParallelConfig(4, tensor_parallel=2, pipeline_parallel=2, encoder_pipeline_stages=1),
        # middle stages: an encoder stage and a decoder stage in between
        ParallelConfig(4, pipeline_parallel=4, encoder_pipeline_stages=2),
        ParallelConfig(4, tensor_parallel=2, pipeline_parallel=2, encoder_pipeline_stages=1,
                       sequence_parallel=True),
    ]),
    "e2d2_shared_kv": (model_config("e2d2_shared_kv"),
                       [ParallelConfig(4, tensor_parallel=2, use_distributed_optimizer=True)]),
    "bd3lm": (model_config("bd3lm"), [ParallelConfig(4, tensor_parallel=2, pipeline_parallel=2)]),
    "e2d2_vocab1024": (model_config("e2d2", **BIG_VOCAB), [
        ParallelConfig(4, **PP2_DISTOPT),
        ParallelConfig(4, tensor_parallel=2, **PP2_DISTOPT),  # configs/h100-1b-e2d2.yaml at DP1
    ]),
    # Untied: copies on stage 0 (x0) and stage 1 (xt), the LM head separate.
    "e2d2_vocab1024_untied": (model_config("e2d2", tie_word_embeddings=False, **BIG_VOCAB),
                              [ParallelConfig(4, **PP2_DISTOPT)]),
    # Interleaved: copies on virtual stages 0 and 3, the last in a chunk without bucketing.
    "e2d2_vocab1024_interleaved": (model_config("e2d2", vocab_size=1024, num_layers=3), [
        ParallelConfig(4, pipeline_parallel=2, virtual_pipeline=2, encoder_pipeline_stages=2,
                       use_distributed_optimizer=True),
    ]),
}
# Layouts under which the parameter attributes are compared with megatron's GPTModel.
ATTRIBUTE_LAYOUTS = (ParallelConfig(4), ParallelConfig(4, pipeline_parallel=2),
                     ParallelConfig(4, tensor_parallel=2, pipeline_parallel=2))
# How megatron reads an absent attribute (``getattr(param, "allreduce", True)`` etc.).
ATTRIBUTE_DEFAULTS = {"allreduce": True, "sequence_parallel": False}


def _attributes(param: torch.nn.Parameter | None) -> dict | None:
    return None if param is None else ATTRIBUTE_DEFAULTS | vars(param)


def param_attributes(cfg: ModelConfig, parallel: ParallelConfig) -> tuple[dict, dict]:
    """The attributes of this rank's word-embedding copy, untied LM head, the fused
    column-parallel weights (q|k|v, gate|up), a row-parallel weight and a norm: ours, and
    those of megatron's own GPTModel (same sizes, layout and tying, megatron's
    initialisation) on the same pipeline rank."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_ext.model import build_chunks, transformer_config

    tied = cfg.tie_word_embeddings
    plan = PipelinePlan(cfg, parallel)
    with megatron_layout(parallel, get_embedding_ranks=plan.get_embedding_ranks):
        (stage,) = build_chunks(cfg, parallel)
        config = dataclasses.replace(transformer_config(cfg, parallel), perform_initialization=True,
                                     normalization="RMSNorm", qk_layernorm=False)
        gpt = GPTModel(config, get_gpt_layer_local_spec(normalization="RMSNorm"),
                       vocab_size=cfg.vocab_size, max_sequence_length=cfg.seq_length,
                       position_embedding_type="rope", pre_process=stage.pre_process,
                       post_process=stage.post_process, share_embeddings_and_output_weights=tied)
        layer, gpt_layer = stage.layers[0], gpt.decoder.layers[0]
        ours = {
            "embedding": stage.embed.weight if hasattr(stage, "embed") else None,
            "head": None if tied or not stage.post_process else stage.lm_head.weight,
            "qkv": layer.attn.linear_qkv.weight, "fc1": layer.mlp.linear_fc1.weight,
            "row": layer.attn.o_proj.weight,
            "norm": layer.input_norm.weight,
        }
        megatrons = {
            "embedding": gpt.embedding.word_embeddings.weight if gpt.pre_process else (
                gpt.output_layer.weight if tied else None),  # the tied head is the copy
            "head": None if tied or not gpt.post_process else gpt.output_layer.weight,
            "qkv": gpt_layer.self_attention.linear_qkv.weight, "fc1": gpt_layer.mlp.linear_fc1.weight,
            "row": gpt_layer.self_attention.linear_proj.weight,
            "norm": gpt_layer.input_layernorm.weight,
        }
        return ({k: _attributes(v) for k, v in ours.items()},
                {k: _attributes(v) for k, v in megatrons.items()})


def initial_weights(cfg: ModelConfig, parallel: ParallelConfig) -> tuple[dict, dict]:
    """(full weights gathered after ``initialize_at_seed`` under ``parallel``, the reference
    model's at the same seed), with chunks of 100 elements, so that chunk boundaries fall
    inside every TP shard."""
    from e2d2 import init
    from megatron_ext.mapping import gather_reference_state, initialize_at_seed
    from megatron_ext.model import build_chunks

    plan, chunk_elements = PipelinePlan(cfg, parallel), init.CHUNK_ELEMENTS
    init.CHUNK_ELEMENTS = 100
    try:
        with megatron_layout(parallel, get_embedding_ranks=plan.get_embedding_ranks):
            stages = build_chunks(cfg, parallel)
            for stage in stages:
                initialize_at_seed(stage, cfg, 11)
            return gather_reference_state(stages), reference_state_at_seed(cfg, 11)
    finally:
        init.CHUNK_ELEMENTS = chunk_elements


def _world4(rank: int, ckpt_dir: str) -> dict:
    out = {"initial": initial_weights(model_config("e2d2", tie_word_embeddings=False, **BIG_VOCAB),
                                      ParallelConfig(4, tensor_parallel=2, pipeline_parallel=2,
                                                     encoder_pipeline_stages=1))}
    for case, (cfg, layouts) in WORLD4.items():
        out[case] = {"reference": reference_run(cfg, PLAIN)}
        for parallel in layouts:
            save_to = ckpt_dir if parallel.name == SAVED_LAYOUT and case == "e2d2" else None
            run = _micro2(PLAIN) if parallel.sequence_parallel else PLAIN
            out[case][parallel.name] = parallel_run(cfg, parallel, run, save_to=save_to)
    cfg = model_config("e2d2")
    for parallel in (ParallelConfig(4), ParallelConfig(4, pipeline_parallel=2,
                                                       encoder_pipeline_stages=1)):
        out["e2d2"]["load-" + parallel.name] = loaded_params(cfg, parallel, ckpt_dir)
    # A single stack has megatron's roles: the embedding on the first stage, the head on the last.
    out["attributes"] = {
        f"{parallel.name}-{tie}": param_attributes(
            model_config("bd3lm", tie_word_embeddings=tie == "tied"), parallel)
        for parallel in ATTRIBUTE_LAYOUTS for tie in ("tied", "untied")
    }
    return out


def _check(per_rank: list[dict], variant: str) -> None:
    reference = per_rank[0][variant]["reference"]
    assert reference["losses"][-1] < reference["losses"][0], "reference does not train"
    names = [n for n in per_rank[0][variant] if n != "reference" and not n.startswith("load-")]
    assert names
    for name in names:
        # DP only splits the batch (the reference sums it in one pass, so equal to rounding);
        # TP changes summation order inside matmuls and megatron's vocab-parallel CE.
        atol = 1e-6 if name.startswith("tp1-pp1") else 1e-5
        problems = compare(reference, [r[variant][name] for r in per_rank], atol, STEPS_ATOL)
        assert not problems, f"{variant} {name}:\n" + "\n".join(problems[:10])


@pytest.fixture(scope="module")
def world2() -> list[dict]:
    return spawn_gloo(_world2, 2)


@pytest.fixture(scope="module")
def world4(tmp_path_factory) -> list[dict]:
    ckpt = tmp_path_factory.mktemp("ckpt") / "tp2pp2"
    return spawn_gloo(_world4, 4, str(ckpt))


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(CASES))
def test_tp2_pp2_dp2_match_reference(world2, variant):
    _check(world2, variant)


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(WORLD4))
def test_four_ranks_match_reference(world4, variant):
    _check(world4, variant)


@pytest.mark.slow
def test_parameter_attributes_match_megatron_gptmodel(world4):
    for rank, result in enumerate(world4):
        for layout, (ours, megatrons) in result["attributes"].items():
            for role in ours:
                assert ours[role] == megatrons[role], f"rank {rank} {layout} {role}"


@pytest.mark.slow
def test_per_shard_initialisation_at_tp2pp2_is_the_reference_models_bitwise(world4):
    for rank, result in enumerate(world4):
        shards, reference = result["initial"]
        assert shards.keys() == reference.keys()
        for name in reference:
            assert torch.equal(shards[name], reference[name]), f"rank {rank}: {name}"


@pytest.mark.slow
def test_checkpoint_tp2pp2_loads_at_tp1_and_pp2(world4):
    saved = world4[0]["e2d2"][SAVED_LAYOUT]["params"]
    initial = reference_state_at_seed(model_config("e2d2"), PLAIN.seed)
    assert any(not torch.equal(saved[n], initial[n]) for n in saved), "nothing was trained"
    for layout in ("load-tp1-pp1-dp4", "load-tp1-pp2-dp2-enc1"):
        for rank, result in enumerate(world4):
            loaded = result["e2d2"][layout]
            assert loaded.keys() == saved.keys()
            for name in saved:
                assert torch.equal(loaded[name], saved[name]), f"{layout} rank {rank}: {name}"


def test_tiny_model_with_a_bigger_vocabulary_keeps_mask_the_last_id():
    cfg = model_config("e2d2", **BIG_VOCAB)
    assert (cfg.vocab_size, cfg.mask_token_id) == (1024, 1023)
