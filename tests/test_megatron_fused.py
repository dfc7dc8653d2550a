"""The fused projections (``linear_qkv``, ``linear_fc1``): megatron's layouts, a lossless
mapping to and from the reference names at TP1 and TP2 with grouped-query attention, one
backward all-reduce per fused linear, and checkpoints in the format written before the
fusion (one tensor per reference name) load into the fused model at another TP, and the
per-shard initialisation fills every part."""

from __future__ import annotations

import pytest
import torch

from megatron_ext.groups import megatron_layout
from megatron_ext.layout import ParallelConfig
from megatron_ext.mapping import reference_state_at_seed
from megatron_ext.testing import counted_all_reduces, spawn_gloo
from megatron_ext.verify import Run, compare, parallel_run, reference_run
from megatron_ext.verify import tiny_model_config as model_config

# 8 query heads in 4 groups: at TP2 each rank holds 2 groups of 2 query heads, so q, k and
# v are strided inside linear_qkv (the layout a contiguous split would get wrong).
GQA = dict(num_attention_heads=8, num_query_groups=4)  # head_dim 32 / 8 = 4


def megatron_qkv(state: dict, layer: str, cfg, tp: int, rank: int) -> torch.Tensor:
    """TP rank ``rank``'s linear_qkv weight, built as megatron-core lays it out (attention.py
    ``get_query_key_value_tensors``: per query group its q heads, its k head, its v head)."""
    d, g = cfg.kv_channels, cfg.num_query_groups
    per_group = cfg.num_attention_heads // g * d
    q, k, v = (state[f"{layer}.attn.{n}_proj.weight"] for n in "qkv")
    groups = range(rank * g // tp, (rank + 1) * g // tp)
    return torch.cat([torch.cat((q[j * per_group:(j + 1) * per_group], k[j * d:(j + 1) * d],
                                 v[j * d:(j + 1) * d])) for j in groups])


def megatron_fc1(state: dict, layer: str, tp: int, rank: int) -> torch.Tensor:
    """megatron's SwiGLU linear_fc1 on TP rank ``rank``: [gate shard; up shard]."""
    gate, up = (state[f"{layer}.mlp.{n}_proj.weight"].chunk(tp)[rank] for n in ("gate", "up"))
    return torch.cat((gate, up))


def _layer_counts(cfg, parallel: ParallelConfig) -> dict:
    """Backward all-reduces of one micro-batch for ``cfg`` and one layer deeper models."""
    import dataclasses

    from megatron_ext.mapping import load_reference_state
    from megatron_ext.model import build_chunks

    counts = {}
    for name, c in {"base": cfg,
                    "encoder": dataclasses.replace(cfg, num_layers=cfg.num_layers + 1),
                    "decoder": dataclasses.replace(cfg, num_decoder_layers=cfg.num_decoder_layers + 1)
                    }.items():
        with megatron_layout(parallel):
            (stage,) = build_chunks(c, parallel)
            load_reference_state(stage, reference_state_at_seed(c, 0))
            x0 = torch.randint(0, c.vocab_size - 1, (1, c.seq_length))
            logits = stage({"x0": x0, "xt": torch.full_like(x0, c.mask_token_id)})
            with counted_all_reduces() as count:
                logits.square().mean().backward()
            counts[name] = count[0]
    return {kind: counts[kind] - counts["base"] for kind in ("encoder", "decoder")}


def _world2(rank: int, old_format_dir: str) -> dict:
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.dist_checkpointing import ShardedTensor

    from megatron_ext import checkpoint
    from megatron_ext.mapping import (
        gather_reference_state,
        initialize_at_seed,
        load_reference_state,
        param_maps,
    )
    from megatron_ext.model import build_chunks

    cfg = model_config("e2d2", **GQA)
    state = reference_state_at_seed(cfg, 0)
    out = {"layout": {}, "roundtrip": {}, "grads": {}}
    for parallel in (ParallelConfig(2), ParallelConfig(2, tensor_parallel=2)):
        with megatron_layout(parallel):
            tp, tp_rank = (parallel_state.get_tensor_model_parallel_world_size(),
                           parallel_state.get_tensor_model_parallel_rank())
            (stage,) = build_chunks(cfg, parallel)
            load_reference_state(stage, state)
            layers = [("layers.1", stage.layers[1]), ("decoder_layers.0", stage.decoder_layers[0])]
            out["layout"][parallel.name] = all(
                torch.equal(layer.attn.linear_qkv.weight, megatron_qkv(state, name, cfg, tp, tp_rank))
                and torch.equal(layer.mlp.linear_fc1.weight, megatron_fc1(state, name, tp, tp_rank))
                for name, layer in layers)
            out["roundtrip"][parallel.name] = gather_reference_state([stage])
            for m in param_maps(stage):  # a gradient that differs from the weight everywhere
                m.param.main_grad = m.param.detach() * 2 + 1
            out["grads"][parallel.name] = gather_reference_state([stage], grads=True)
    # The checkpoint format before the fusion: one ShardedTensor per reference name (TP1).
    trained = {k: v + 0.5 for k, v in state.items()}
    dist_checkpointing.save({f"model.{k}": ShardedTensor.from_rank_offsets(
        f"model.{k}", v, replica_id=rank) for k, v in trained.items()}, old_format_dir)
    parallel = ParallelConfig(2, tensor_parallel=2)
    with megatron_layout(parallel):
        stages = build_chunks(cfg, parallel)
        checkpoint.load(stages, old_format_dir)
        out["old_format_loaded"] = gather_reference_state(stages)
    out["trained"] = trained
    with megatron_layout(parallel):  # per-shard initialisation writes each part of each group
        stages = build_chunks(cfg, parallel)
        for stage in stages:
            initialize_at_seed(stage, cfg, 3)
        out["initialized"] = gather_reference_state(stages)
    out["tp2_gqa"] = parallel_run(cfg, parallel, Run())
    out["all_reduces"] = _layer_counts(model_config("e2d2"), parallel)
    return out


@pytest.fixture(scope="module")
def world2(tmp_path_factory) -> list[dict]:
    return spawn_gloo(_world2, 2, str(tmp_path_factory.mktemp("old_format")))


@pytest.mark.slow
def test_fused_weights_use_megatron_layouts(world2):
    for rank, result in enumerate(world2):
        assert result["layout"] == {"tp1-pp1-dp2": True, "tp2-pp1-dp1": True}, f"rank {rank}"


@pytest.mark.slow
def test_fused_weights_and_grads_round_trip_reference_names_exactly(world2):
    state = reference_state_at_seed(model_config("e2d2", **GQA), 0)
    for result in world2:
        for layout in ("tp1-pp1-dp2", "tp2-pp1-dp1"):
            weights, grads = result["roundtrip"][layout], result["grads"][layout]
            assert weights.keys() == state.keys() == grads.keys(), layout
            for name, ref in state.items():
                assert torch.equal(weights[name], ref), f"{layout} {name}"
                assert torch.equal(grads[name], ref * 2 + 1), f"{layout} grad {name}"


@pytest.mark.slow
def test_gqa_with_two_groups_per_rank_matches_reference(world2):
    reference = reference_run(model_config("e2d2", **GQA), Run())
    problems = compare(reference, [r["tp2_gqa"] for r in world2], 1e-5, 1e-5)
    assert not problems, "\n".join(problems[:10])


@pytest.mark.slow
def test_backward_all_reduces_one_per_fused_linear(world2):
    # Unfused: q, k, v, gate, up each all-reduced its input gradient (5 per layer), and an
    # E2D2 decoder layer's K/V of h_enc 2 more. Fused: linear_qkv, linear_fc1, and the k|v
    # rows of linear_qkv applied to h_enc.
    assert world2[0]["all_reduces"] == {"encoder": 2, "decoder": 3}


@pytest.mark.slow
def test_checkpoint_written_before_the_fusion_loads_at_tp2(world2):
    for result in world2:
        loaded, trained = result["old_format_loaded"], result["trained"]
        assert loaded.keys() == trained.keys()
        for name, tensor in trained.items():
            assert torch.equal(loaded[name], tensor), name


@pytest.mark.slow
def test_per_shard_initialisation_of_fused_weights_is_the_reference_one(world2):
    initial = reference_state_at_seed(model_config("e2d2", **GQA), 3)
    for result in world2:
        assert result["initialized"].keys() == initial.keys()
        for name, tensor in initial.items():
            assert torch.equal(result["initialized"][name], tensor), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_swiglu_of_the_fused_fc1_is_autograds_bitwise(dtype):
    """The engine's SwiGLU (one gradient tensor for gate | up, no `cat`) gives the reference
    MLP's output and autograd's gradients to the bit, non-contiguous upstream gradient included."""
    import torch.nn.functional as F

    from megatron_ext.model import _SwiGLU

    g = torch.Generator().manual_seed(0)
    fused = torch.randn(3, 5, 2 * 7, generator=g).to(dtype)
    grad = torch.randn(5, 3, 7, generator=g).to(dtype).transpose(0, 1)  # strided, as SP gives
    ours, theirs = fused.clone().requires_grad_(), fused.clone().requires_grad_()
    gate, up = theirs.chunk(2, dim=-1)
    expected = F.silu(gate) * up
    out = _SwiGLU.apply(ours)
    assert torch.equal(out, expected)
    out.backward(grad)
    expected.backward(grad)
    assert torch.equal(ours.grad, theirs.grad)
