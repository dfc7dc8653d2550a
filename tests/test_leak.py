"""No information leaks: a decoder logit in block b has exactly zero gradient with respect to
the clean embeddings of blocks >= b and the noisy embeddings of every other block (with
``shift``: of every slot outside the block's shifted window ``[bS - 1, bS + S - 2]``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from e2d2.config import ModelConfig
from e2d2.model import DiffusionLM

L, S = 16, 4


class RecordingEmbedding(nn.Module):
    """Wraps the embedding so each call's output is a leaf we can differentiate against."""

    def __init__(self, embed: nn.Embedding):
        super().__init__()
        self.inner = embed
        self.weight = embed.weight  # the tied LM head reads it
        self.outputs: list[torch.Tensor] = []

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.inner(ids).detach().requires_grad_(True)
        self.outputs.append(out)
        return out


def _clean_and_noisy_embeddings(model: DiffusionLM, recorder: RecordingEmbedding):
    """(clean leaf, slice), (noisy leaf, slice) for the variant's embedding calls."""
    if model.cfg.variant == "bd3lm":  # one call over [x0 ; xt]
        both = recorder.outputs[0]
        return (both, slice(0, L)), (both, slice(L, 2 * L))
    clean, noisy = recorder.outputs
    return (clean, slice(0, L)), (noisy, slice(0, L))


CONFIGS = {
    "e2d2": dict(variant="e2d2", num_layers=3, num_decoder_layers=2),
    "e2d2_shared_kv": dict(variant="e2d2_shared_kv", num_layers=3, num_decoder_layers=2),
    "e2d2_shared_kv_tied": dict(variant="e2d2_shared_kv", num_layers=3, num_decoder_layers=2,
                                tie_decoder_to_encoder=True),
    "bd3lm": dict(variant="bd3lm", num_layers=3, num_decoder_layers=0),
    "bd3lm_bidirectional_prompt": dict(variant="bd3lm", num_layers=3, num_decoder_layers=0,
                                       bidirectional_prompt=True),
    "e2d2_shift": dict(variant="e2d2", num_layers=3, num_decoder_layers=2, shift=True),
    "e2d2_shared_kv_shift": dict(variant="e2d2_shared_kv", num_layers=3, num_decoder_layers=2,
                                 shift=True),
    "bd3lm_shift": dict(variant="bd3lm", num_layers=3, num_decoder_layers=0, shift=True),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("padded", [False, True])
def test_decoder_logits_do_not_see_the_future_or_other_noisy_blocks(name, padded):
    """One row per prompt length 0..L (mid-block ones included): the logits of block b see no
    clean target (non-context token) of blocks >= b, and no noisy token of another block."""
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2,
                      seq_length=L, block_size=S, **CONFIGS[name])
    model = DiffusionLM(cfg).double()
    recorder = RecordingEmbedding(model.embed)
    model.embed = recorder
    rows = L + 1
    n_ctx = torch.arange(rows)
    context = torch.arange(L)[None, :] < n_ctx[:, None]  # row r: a prompt of r tokens
    x0 = torch.randint(0, cfg.mask_token_id, (rows, L))
    noised = (torch.rand(rows, L) < 0.5) & ~context  # context is never noised
    xt = torch.where(noised, torch.full_like(x0, cfg.mask_token_id), x0)
    attention_mask = torch.ones(rows, L, dtype=torch.bool)
    if padded:
        attention_mask[::2, -3:] = False
        context &= attention_mask
    logits = model(x0, xt, attention_mask=attention_mask if padded else None, context_mask=context)
    (clean, cs), (noisy, ns) = _clean_and_noisy_embeddings(model, recorder)
    probe = torch.randn_like(logits)  # a generic functional of every logit in the block
    for b in range(L // S):
        block = slice(b * S, (b + 1) * S)
        g_clean, g_noisy = torch.autograd.grad(
            (logits[:, block] * probe[:, block]).sum(), (clean, noisy), retain_graph=True, allow_unused=True
        )
        g_clean = g_clean[:, cs].abs().sum(-1)  # [rows, L]
        g_noisy = g_noisy[:, ns].abs().sum(-1)
        future_target = (torch.arange(L) >= b * S)[None, :] & ~context
        leaks = (g_clean > 0) & future_target
        assert not leaks.any(), (f"block {b} sees clean targets of blocks >= {b} "
                                 f"(prompt length, position): {leaks.nonzero().tolist()[:4]}")
        window = slice(max(b * S - 1, 0), (b + 1) * S - 1) if cfg.shift else block
        other = torch.ones(L, dtype=torch.bool)
        other[window] = False
        assert torch.all(g_noisy[:, other] == 0), f"block {b} sees noisy tokens of other blocks"
        # The test can fail: the allowed inputs do reach the logits.
        assert torch.all(g_noisy[0, window] > 0)
        if b > 0:  # with shift, x0[bS - 1] comes in through the noisy window instead
            assert torch.all(g_clean[:, : b * S - cfg.shift] > 0)
