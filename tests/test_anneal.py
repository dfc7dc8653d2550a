"""Attention-mask annealing (spec 7, DiffuLLaMA): at step 0 the mask is the target's causal
part, at step K the variant's mask, at K/2 about half of the entries between them are
visible, and the visible set only grows. The oracles are the definition (target AND
(causal OR u < r), causal on positions within each stream), with the target mask itself
checked against a brute-force reading of the spec in tests/test_masks.py."""

from __future__ import annotations

import warnings

import pytest
import torch

from e2d2 import masks
from e2d2.attention import build_mask, static_mask
from e2d2.config import DiffusionConfig, ModelConfig
from e2d2.diffusion import DiffusionObjective
from e2d2.errors import ConfigError

K = 100
SPECS = [masks.E2D2_ENCODER, masks.E2D2_DECODER, masks.BD3LM, masks.MDLM,
         masks.with_shift(masks.E2D2_DECODER, True), masks.with_shift(masks.BD3LM, True)]
IDS = [f"{s.name}{'-shift' if s.shift else ''}" for s in SPECS]


def _causal(spec: masks.AttentionMask, L: int) -> torch.Tensor:
    """``bool[Lq, Lk]``: key position <= query position, positions taken within each stream."""
    lq, lk = spec.shape(L)
    q_pos = torch.tensor([i % L for i in range(lq)])
    k_pos = torch.tensor([j % L for j in range(lk)])
    return k_pos[None, :] <= q_pos[:, None]


def _ctx_pad(L: int) -> tuple[torch.Tensor, torch.Tensor]:
    ctx = torch.zeros(2, L, dtype=torch.bool)
    ctx[0, :6] = True  # ends inside a block
    pad = torch.ones(2, L, dtype=torch.bool)
    pad[1, -5:] = False
    return ctx, pad


def test_ratio_schedule():
    assert [masks.anneal_ratio(s, K) for s in (0, K // 2, K, 3 * K)] == [0.0, 0.5, 1.0, 1.0]
    assert masks.anneal_ratio(0, 0) == 1.0  # K = 0: no annealing
    objective = DiffusionObjective(ModelConfig(variant="mdlm", num_decoder_layers=0),
                                   DiffusionConfig(anneal_steps=K))
    assert objective.anneal_ratio(K // 4) == 0.25 and objective.anneal_ratio(None) == 1.0


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
@pytest.mark.parametrize("with_prompt", [False, True], ids=["plain", "prompt_pad"])
def test_schedule_at_0_half_and_K(spec, with_prompt):
    L, S = 32, 4
    ctx, pad = _ctx_pad(L) if with_prompt else (None, None)
    spec = masks.with_prompt_rule(spec, True)
    target = spec.dense(L, S, ctx, pad)
    causal = _causal(spec, L)

    def at(step: int) -> torch.Tensor:
        return masks.with_anneal(spec, masks.anneal_ratio(step, K)).dense(L, S, ctx, pad)

    start = at(0)
    assert torch.equal(start, target & causal)
    assert bool(start.any(-1).all()), "no softmax row may be empty"
    assert masks.with_anneal(spec, masks.anneal_ratio(K, K)) is spec  # the cached static mask
    assert torch.equal(at(K), target)

    between = target & ~causal
    half = at(K // 2)
    assert torch.equal(half & ~between, target & causal)  # only target entries are added
    fraction = (half & between).sum().item() / between.sum().item()
    assert 0.4 < fraction < 0.6, fraction

    previous = start
    for step in range(0, K + 1, 10):
        now = at(step)
        assert torch.equal(now & previous, previous), f"an entry disappeared at step {step}"
        previous = now


def test_hash_is_spread_and_deterministic():
    q = torch.arange(256).view(-1, 1)
    k = torch.arange(256).view(1, -1)
    u = masks.pair_hash(q, k).double() / 2**32
    assert 0.0 <= u.min() and u.max() < 1.0
    assert abs(u.mean().item() - 0.5) < 0.01
    # the diagonals of a naive q - k hash would collide; rows and columns must look independent
    assert abs(torch.corrcoef(torch.stack((u[:-1].flatten(), u[1:].flatten())))[0, 1].item()) < 0.02
    assert torch.equal(masks.pair_hash(q.int(), k.int()), masks.pair_hash(q, k))  # flex passes int32


def test_annealed_mask_bypasses_the_static_cache():
    spec = masks.with_anneal(masks.E2D2_ENCODER, 0.3)
    before = static_mask.cache_info().currsize
    got = build_mask(spec, 16, 4, torch.device("cpu"))
    assert static_mask.cache_info().currsize == before
    assert torch.equal(got, spec.dense(16, 4))


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_flex_attention_of_the_annealed_mask_equals_sdpa(spec):
    """The same rule as a FlexAttention mask_mod (CPU, eager forward): the block mask marks the
    dense mask's tiles and the attention output matches SDPA with the dense mask."""
    from torch.nn.attention.flex_attention import flex_attention

    L, S = 256, 4
    spec = masks.with_anneal(masks.with_prompt_rule(spec, True), 0.37)
    ctx, pad = _ctx_pad(L)
    block_mask = spec.block_mask(L, S, batch_size=2, context=ctx, padding=pad, device="cpu")
    dense = spec.dense(L, S, ctx, pad)
    lq, lk = spec.shape(L)
    tiles = dense.view(2, lq // 128, 128, lk // 128, 128).any(4).any(2)
    assert torch.equal(block_mask.to_dense().bool().squeeze(1), tiles)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, lq, 16, generator=g)
    k, v = torch.randn(2, 2, lk, 16, generator=g), torch.randn(2, 2, lk, 16, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "called without torch.compile": eager is the point
        got = flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense[:, None],
                                                                enable_gqa=True)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_bad_settings_are_one_clear_error():
    with pytest.raises(ConfigError, match="anneal_steps must be >= 0"):
        DiffusionConfig(anneal_steps=-1)
    with pytest.raises(ConfigError, match="'ar' variant has only the causal"):
        DiffusionObjective(ModelConfig(variant="ar", num_decoder_layers=0), DiffusionConfig(anneal_steps=5))
