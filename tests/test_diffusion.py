"""Noising, the SUBS parameterization and the NELBO estimator."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from e2d2.config import DiffusionConfig, ModelConfig
from e2d2.diffusion import DiffusionObjective, noise, sample_block_times, subs_logits, token_nll
from e2d2.noise import get_schedule

V, MASK = 50, 49


class UniformLogits(nn.Module):
    """Logits constant over the vocabulary: after SUBS, uniform over the V-1 non-mask tokens."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg

    def forward(self, x0, xt, attention_mask=None, context_mask=None):
        return torch.zeros(*x0.shape, self.cfg.vocab_size, dtype=torch.float64)


@pytest.mark.parametrize("variant,schedule", [("e2d2", "linear"), ("bd3lm", "linear"), ("mdlm", "linear"),
                                              ("e2d2", "cosine"), ("e2d2", "log")])
def test_uniform_model_nelbo_is_log_v_minus_1(variant, schedule):
    cfg = ModelConfig(variant=variant, vocab_size=V, mask_token_id=MASK, seq_length=64, block_size=4,
                      num_decoder_layers=1 if variant == "e2d2" else 0)
    objective = DiffusionObjective(cfg, DiffusionConfig(schedule=schedule))
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, MASK, (4096, 64), generator=gen)
    values = objective.nelbo(UniformLogits(cfg), x0, generator=gen).double()
    mean, err = values.mean().item(), values.std().item() / math.sqrt(len(values))
    # The schedule's total mass alpha(eps) - alpha(1) is 1 up to its eps: expected NELBO.
    alpha, _ = get_schedule(schedule)(torch.tensor([objective.sampling_eps, 1.0], dtype=torch.float64))
    expected = (alpha[0] - alpha[1]).item() * math.log(V - 1)
    assert abs(mean - expected) < 4 * err + 1e-3 * expected, (mean, expected, err)
    assert abs(mean - math.log(V - 1)) < 0.02 * math.log(V - 1)


def test_every_block_has_a_masked_token_in_training_only():
    x0 = torch.randint(0, MASK, (64, 32))
    t = torch.full((64, 8), 1e-4)  # almost nothing gets masked by chance
    sched = get_schedule("linear")
    train = noise(x0, t, sched, 4, MASK, ensure_masked=True, generator=torch.Generator().manual_seed(0))
    assert torch.all(train.masked.view(64, 8, 4).any(-1))
    assert torch.equal(train.xt == MASK, train.masked)
    evaluation = noise(x0, t, sched, 4, MASK, ensure_masked=False, generator=torch.Generator().manual_seed(0))
    assert evaluation.masked.sum() < 10


def test_remasked_count_is_spread_over_1_to_block_size():
    x0 = torch.randint(0, MASK, (2000, 4))
    nb = noise(x0, torch.full((2000, 1), 1e-6), get_schedule("linear"), 4, MASK,
               generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(nb.masked.sum(-1), minlength=5)
    assert counts[0] == 0 and torch.all(counts[1:] > 350)  # ~uniform over {1, 2, 3, 4}


def test_context_and_padding_are_never_noised_nor_counted():
    x0 = torch.randint(0, MASK, (8, 16))
    ctx = torch.zeros(8, 16, dtype=torch.bool)
    ctx[:, :5] = True
    pad = torch.ones(8, 16, dtype=torch.bool)
    pad[:, -3:] = False
    # t = 1: alpha = 0, so every eligible token is masked, deterministically
    nb = noise(x0, torch.ones(8, 4), get_schedule("linear"), 4, MASK, pad, ctx,
               generator=torch.Generator().manual_seed(0))
    assert not nb.masked[:, :5].any() and not nb.masked[:, -3:].any()
    assert nb.masked[:, 5:13].all()
    assert torch.equal(nb.loss_mask, pad & ~ctx)


def test_block_times_are_shared_within_a_block_and_stratified():
    t = sample_block_times(4, 8, antithetic=True, sampling_eps=0.0, generator=torch.Generator().manual_seed(1))
    sorted_t = t.flatten().sort().values
    assert torch.allclose(sorted_t.diff(), torch.full((31,), 1 / 32), atol=1e-6)
    nb = noise(torch.zeros(4, 32, dtype=torch.long), t, get_schedule("linear"), 4, MASK)
    assert torch.equal(nb.t.view(4, 8, 4), t[..., None].expand(4, 8, 4))


def test_subs_never_predicts_mask_and_copies_unmasked_tokens():
    logits = torch.randn(2, 6, V)
    xt = torch.tensor([[1, MASK, 3, MASK, 5, MASK], [MASK] * 6])
    logp = subs_logits(logits, xt, MASK)
    assert torch.all(logp[..., MASK] == float("-inf"))
    assert torch.all(logp[0, [0, 2, 4]].gather(-1, xt[0, [0, 2, 4], None]) == 0)
    torch.testing.assert_close(logp.exp().sum(-1), torch.ones(2, 6))
    x0 = torch.randint(0, MASK, (2, 6))
    masked_positions = xt == MASK
    nll = token_nll(logits, x0, MASK)
    torch.testing.assert_close(nll[masked_positions], -logp.gather(-1, x0[..., None])[..., 0][masked_positions])
