"""Every mask equals a brute-force, per-element reading of the spec, and FlexAttention's
mask_mod built from the same rule agrees with the dense tensor."""

from __future__ import annotations

import itertools

import pytest
import torch

from e2d2 import masks


def _brute(kind: str, L: int, S: int, ctx: list[bool], pad: list[bool]) -> torch.Tensor:
    """Spec section 3 written as nested loops over (query, key).

    Prompts (spec 1, 3.1): context tokens read each other bidirectionally, and a target (a
    non-context token) never reaches the logits of its own block. So a clean context query
    reads the clean context keys, all of them and only them: were it to read a clean target
    of its block as well, a context token of an earlier block that reads it would carry that
    target to the target's own decoder block. This holds for the E2D2 encoder and, when asked
    for, BD3-LM's clean part; BD3-LM by default ignores context, as the authors' code does.
    """
    two = kind.startswith("bd3lm")
    lq = 2 * L if two else L
    lk = 2 * L if two or kind == "e2d2_decoder" else L
    out = torch.zeros(lq, lk, dtype=torch.bool)
    for qi in range(lq):
        for ki in range(lk):
            if kind == "e2d2_encoder":
                q, k, q_clean, k_clean = qi, ki, True, True
                ok = k // S <= q // S
            elif kind == "e2d2_decoder":
                q, q_clean = qi, False
                k_clean, k = ki < L, ki % L
                ok = (k // S < q // S) if k_clean else (k // S == q // S)
            elif two:
                q_clean, k_clean, q, k = qi < L, ki < L, qi % L, ki % L
                if q_clean and k_clean:
                    ok = k // S <= q // S
                elif q_clean and not k_clean:
                    ok = False
                elif k_clean:
                    ok = k // S < q // S
                else:
                    ok = k // S == q // S
            elif kind == "mdlm":
                q, k, q_clean, k_clean, ok = qi, ki, False, False, True
            else:  # ar
                q, k, q_clean, k_clean, ok = qi, ki, False, False, ki <= qi
            if kind in ("e2d2_encoder", "bd3lm_bidirectional_prompt") and q_clean and ctx[q]:
                ok = k_clean and ctx[k]
            if not pad[k]:
                ok = False
            same_token = q == k and (q_clean == k_clean or kind == "e2d2_decoder" and not k_clean)
            if not pad[q] and same_token:
                ok = True
            out[qi, ki] = ok
    return out


def _dense(kind: str, L: int, S: int, ctx: torch.Tensor | None, pad: torch.Tensor | None) -> torch.Tensor:
    if kind == "mdlm":
        return masks.mdlm(L, padding=pad)
    if kind == "ar":
        return masks.ar(L, padding=pad)
    if kind == "bd3lm_bidirectional_prompt":
        return masks.bd3lm(L, S, context=ctx, padding=pad, bidirectional_context=True)
    fn = {"e2d2_encoder": masks.e2d2_encoder, "e2d2_decoder": masks.e2d2_decoder, "bd3lm": masks.bd3lm}[kind]
    return fn(L, S, context=ctx, padding=pad)


KINDS = ["e2d2_encoder", "e2d2_decoder", "bd3lm", "bd3lm_bidirectional_prompt", "mdlm", "ar"]
CASES = [
    # (L, S, n_context, n_pad)
    (4, 1, 0, 0), (4, 4, 0, 0), (8, 2, 0, 0), (8, 4, 3, 0), (12, 3, 0, 2), (12, 4, 5, 3),
    (16, 4, 4, 4), (16, 8, 9, 1), (10, 5, 2, 7), (6, 2, 6, 0),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("L,S,n_ctx,n_pad", CASES)
def test_mask_matches_brute_force(kind, L, S, n_ctx, n_pad):
    ctx = [i < n_ctx for i in range(L)]
    pad = [i < L - n_pad for i in range(L)]
    expected = _brute(kind, L, S, ctx, pad)
    got = _dense(kind, L, S, torch.tensor([ctx]) if n_ctx else None, torch.tensor([pad]) if n_pad else None)
    got = got[0] if got.dim() == 3 else got
    assert got.dtype == torch.bool
    assert torch.equal(got, expected), f"{kind} differs at {(got != expected).nonzero().tolist()[:5]}"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("L,S,n_pad", [(12, 4, 0), (12, 4, 3), (8, 2, 1)])
def test_mask_matches_brute_force_for_every_prompt_length(kind, L, S, n_pad):
    """Every context length 0..L, mid-block ones included, in one batch of L + 1 rows."""
    ctx = [[i < n for i in range(L)] for n in range(L + 1)]
    pad = [[i < L - n_pad for i in range(L)]] * (L + 1)
    got = _dense(kind, L, S, torch.tensor(ctx), torch.tensor(pad))
    for n in range(L + 1):
        expected = _brute(kind, L, S, ctx[n], pad[n])
        assert torch.equal(got[n], expected), f"{kind}, prompt {n}: {(got[n] != expected).nonzero().tolist()[:5]}"


def test_unbatched_shapes_follow_the_interface():
    assert masks.e2d2_encoder(8, 4).shape == (8, 8)
    assert masks.e2d2_decoder(8, 4).shape == (8, 16)
    assert masks.bd3lm(8, 4).shape == (16, 16)


def test_batched_context_and_padding_are_per_sequence():
    ctx = torch.tensor([[1, 1, 1, 0, 0, 0, 0, 0], [0] * 8]).bool()
    pad = torch.tensor([[1] * 8, [1] * 6 + [0] * 2]).bool()
    m = masks.e2d2_encoder(8, 2, context=ctx, padding=pad)
    for b in range(2):
        expected = _brute("e2d2_encoder", 8, 2, ctx[b].tolist(), pad[b].tolist())
        assert torch.equal(m[b], expected)


def test_no_softmax_row_is_empty():
    for kind, (L, S) in itertools.product(KINDS, [(8, 2), (12, 4)]):
        pad = torch.tensor([[True] * (L - 3) + [False] * 3])
        m = _dense(kind, L, S, None, pad)
        assert m.any(-1).all(), kind


@pytest.mark.parametrize("spec", [masks.E2D2_ENCODER, masks.E2D2_DECODER, masks.BD3LM, masks.MDLM, masks.AR,
                                  masks.with_prompt_rule(masks.BD3LM, True)], ids=lambda s: f"{s.name}-{s.bidirectional_context}")
def test_flex_block_mask_equals_dense(spec):
    """The FlexAttention BlockMask (built from the same mask_mod) marks exactly the dense mask."""
    L, S = 256, 4  # FlexAttention tiles are 128 wide: use several tiles
    pad = torch.ones(2, L, dtype=torch.bool)
    pad[1, -37:] = False
    ctx = torch.zeros(2, L, dtype=torch.bool)
    ctx[0, :10] = True
    block_mask = spec.block_mask(L, S, batch_size=2, context=ctx, padding=pad, device="cpu")
    dense = spec.dense(L, S, ctx, pad)
    assert torch.equal(block_mask.to_dense().bool().squeeze(1), _tiles(dense, 128).bool())


@pytest.mark.parametrize("spec", [masks.E2D2_ENCODER, masks.E2D2_DECODER, masks.BD3LM, masks.MDLM, masks.AR,
                                  masks.with_prompt_rule(masks.BD3LM, True)], ids=lambda s: f"{s.name}-{s.bidirectional_context}")
def test_flex_attention_forward_equals_sdpa_with_the_dense_mask(spec):
    """FlexAttention itself, run (its forward works on CPU in eager mode; there is no CPU
    backward), with a mid-block prompt and padding: the GPU path's mask logic, checked here."""
    import warnings

    from torch.nn.attention.flex_attention import flex_attention

    L, S = 256, 4
    pad = torch.ones(2, L, dtype=torch.bool)
    pad[1, -37:] = False
    ctx = torch.zeros(2, L, dtype=torch.bool)
    ctx[0, :10] = True  # ends inside block 2
    ctx[1, :131] = True  # crosses a 128-wide tile
    lq, lk = spec.shape(L)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, lq, 16, generator=g)
    k, v = torch.randn(2, 2, lk, 16, generator=g), torch.randn(2, 2, lk, 16, generator=g)
    block_mask = spec.block_mask(L, S, batch_size=2, context=ctx, padding=pad, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "called without torch.compile": eager is the point here
        got = flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True)
    dense = spec.dense(L, S, ctx, pad)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense[:, None], enable_gqa=True)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _tiles(dense: torch.Tensor, tile: int) -> torch.Tensor:
    """Which ``tile x tile`` tiles of ``dense [B, Lq, Lk]`` contain any allowed entry."""
    b, lq, lk = dense.shape
    return dense.view(b, lq // tile, tile, lk // tile, tile).any(4).any(2)
