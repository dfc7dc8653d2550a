"""Batch-independent attention masks are built once per (mask, L, S) and reused; a model
using the cached mask computes exactly what it computes with a freshly built per-batch one."""

from __future__ import annotations

import torch

from e2d2 import masks
from e2d2.attention import annealed_mask, build_mask, static_mask
from e2d2.config import ModelConfig
from e2d2.model import DiffusionLM

CPU = torch.device("cpu")


def test_cache_returns_the_same_mask_object_per_mask_length_and_block():
    first = build_mask(masks.E2D2_DECODER, 16, 4, CPU, batch_size=2)
    assert build_mask(masks.E2D2_DECODER, 16, 4, "cpu", batch_size=3) is first
    assert torch.equal(first, masks.E2D2_DECODER.dense(16, 4))
    assert build_mask(masks.E2D2_ENCODER, 16, 4, CPU) is not first
    assert build_mask(masks.E2D2_DECODER, 16, 2, CPU) is not first
    assert build_mask(masks.E2D2_DECODER, 32, 4, CPU) is not first
    assert static_mask.cache_info().currsize >= 4


def test_an_annealed_mask_is_built_once_per_ratio_and_leaves_the_static_cache_alone():
    static = build_mask(masks.E2D2_ENCODER, 16, 4, CPU)
    for step in range(1, 8):  # one training step per ratio, two micro-batches each
        spec = masks.with_anneal(masks.E2D2_ENCODER, step / 8)
        first = build_mask(spec, 16, 4, CPU, batch_size=2)
        assert build_mask(spec, 16, 4, CPU, batch_size=2) is first
        assert torch.equal(first, spec.dense(16, 4))
    assert annealed_mask.cache_info().currsize <= 4
    assert build_mask(masks.E2D2_ENCODER, 16, 4, CPU) is static


def test_per_batch_masks_are_not_cached():
    padding = torch.ones(2, 16, dtype=torch.bool)
    a = build_mask(masks.E2D2_ENCODER, 16, 4, CPU, 2, None, padding)
    assert build_mask(masks.E2D2_ENCODER, 16, 4, CPU, 2, None, padding) is not a
    assert a.shape == (2, 16, 16)


def test_cached_mask_gives_the_same_logits_as_a_per_batch_mask():
    cfg = ModelConfig(variant="e2d2", vocab_size=64, mask_token_id=63, hidden_size=32,
                      ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2,
                      num_layers=2, num_decoder_layers=1, seq_length=16, block_size=4)
    torch.manual_seed(0)
    model = DiffusionLM(cfg)
    x0 = torch.randint(0, 63, (2, 16))
    xt = torch.where(torch.rand(x0.shape) < 0.5, 63, x0)
    cached = model(x0, xt)
    # All-real padding builds the same mask through the uncached per-batch path.
    per_batch = model(x0, xt, attention_mask=torch.ones_like(x0))
    assert torch.equal(cached, per_batch)
    assert torch.equal(model(x0, xt), cached)  # second call: cached mask, same result
