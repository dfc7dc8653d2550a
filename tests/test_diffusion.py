"""Noising, the SUBS parameterization and the NELBO estimator."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from e2d2.config import SCHEDULES, DiffusionConfig, ModelConfig
from e2d2.diffusion import DiffusionObjective, noise, sample_block_times, subs_logits, token_nll
from e2d2.model import DiffusionLM
from e2d2.noise import evaluation_schedule, get_schedule

V, MASK = 50, 49


class UniformLogits(nn.Module):
    """Logits constant over the vocabulary: after SUBS, uniform over the V-1 non-mask tokens."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg

    def forward(self, x0, xt, attention_mask=None, context_mask=None):
        return torch.zeros(*x0.shape, self.cfg.vocab_size, dtype=torch.float64)


@pytest.mark.parametrize("variant,schedule", [("e2d2", s) for s in SCHEDULES] + [("bd3lm", "linear"),
                                              ("bd3lm", "clipped_linear"), ("mdlm", "linear")])
def test_uniform_model_nelbo_is_log_v_minus_1(variant, schedule):
    """Whatever the training schedule (clipped included), the NELBO of a model that knows
    nothing is log(V - 1): evaluation integrates t over [0, 1] with the true ELBO weight."""
    cfg = ModelConfig(variant=variant, vocab_size=V, mask_token_id=MASK, seq_length=64, block_size=4,
                      num_decoder_layers=1 if variant == "e2d2" else 0)
    objective = DiffusionObjective(cfg, DiffusionConfig(schedule=schedule))
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, MASK, (4096, 64), generator=gen)
    values = objective.nelbo(UniformLogits(cfg), x0, generator=gen).double()
    mean, err = values.mean().item(), values.std().item() / math.sqrt(len(values))
    # The schedule's total mass alpha(eps) - alpha(1) is 1 up to its eps: expected NELBO.
    t = torch.tensor([objective.sampling_eps, 1.0], dtype=torch.float64)
    alpha, _ = evaluation_schedule(schedule)(t)
    expected = (alpha[0] - alpha[1]).item() * math.log(V - 1)
    assert abs(mean - expected) < 4 * err + 1e-3 * expected, (mean, expected, err)
    assert abs(mean - math.log(V - 1)) < 0.02 * math.log(V - 1)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_one_token_nelbo_is_the_cross_entropy(schedule):
    """L = S = 1: the decoder sees only [MASK], so its prediction p does not depend on t and the
    bound is tight: E_t[w(t) 1(masked)] = alpha(eps) - alpha(1), times -log p(x0), exactly.
    A real (non-uniform) model, its cross-entropy computed directly."""
    torch.manual_seed(0)
    cfg = ModelConfig(variant="e2d2", vocab_size=V, mask_token_id=MASK, hidden_size=16, ffn_hidden_size=32,
                      num_attention_heads=2, num_query_groups=1, num_layers=1, num_decoder_layers=1,
                      seq_length=1, block_size=1, init_std=0.5)
    model = DiffusionLM(cfg).double()
    objective = DiffusionObjective(cfg, DiffusionConfig(schedule=schedule))
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randint(0, MASK, (100_000, 1), generator=gen)
    with torch.no_grad():
        logits = model(x0, torch.full_like(x0, MASK))
    ce = token_nll(logits, x0, MASK).mean().item()
    values = objective.nelbo(model, x0, generator=gen).double()
    mean, err = values.mean().item(), values.std().item() / math.sqrt(len(values))
    t = torch.tensor([objective.sampling_eps, 1.0], dtype=torch.float64)
    alpha, _ = evaluation_schedule(schedule)(t)
    expected = (alpha[0] - alpha[1]).item() * ce
    assert ce > math.log(V - 1) + 0.05  # the model is far from uniform: a real check
    assert abs(mean - expected) < 4 * err, (mean, expected, err)
    assert err < 0.01 * ce


def test_clipping_is_for_training_only():
    objective = DiffusionObjective(ModelConfig(vocab_size=V, mask_token_id=MASK, seq_length=64),
                                   DiffusionConfig(schedule="clipped_linear"))
    x0 = torch.randint(0, MASK, (256, 64), generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    train = 1 - objective.noise(x0, train=True, generator=gen).alpha  # mask rates
    evaluation = 1 - objective.noise(x0, train=False, generator=gen).alpha
    assert train.min() >= 0.3 - 1e-6 and train.max() <= 0.8 + 1e-6
    assert evaluation.min() < 0.01 and evaluation.max() > 0.99  # the whole path


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


def test_logits_are_not_changed_in_place():
    logits = torch.randn(2, 6, V)
    before = logits.clone()
    subs_logits(logits, torch.full((2, 6), MASK), MASK)
    token_nll(logits, torch.zeros(2, 6, dtype=torch.long), MASK)
    assert torch.equal(logits, before)


def test_keep_clean_bos_never_masks_position_0_and_matches_the_ar_targets():
    cfg = ModelConfig(vocab_size=V, mask_token_id=MASK, seq_length=16)
    objective = DiffusionObjective(cfg, DiffusionConfig(keep_clean_bos=True))
    x0 = torch.randint(0, MASK, (512, 16))
    nb = objective.noise(x0, generator=torch.Generator().manual_seed(0))
    assert not nb.masked[:, 0].any() and nb.masked[:, 1:].any()
    # the tokens that count are the AR baseline's next-token targets: positions 1..L-1
    assert not nb.loss_mask[:, 0].any() and nb.loss_mask[:, 1:].all()
    assert nb.masked.view(512, 4, 4).any(-1).all()  # block 0 still gets a masked token


@pytest.mark.parametrize("remask_prompt_blocks", [True, False])
def test_prompt_blocks_are_remasked_only_when_asked(remask_prompt_blocks):
    x0 = torch.randint(0, MASK, (256, 8))
    ctx = torch.zeros(256, 8, dtype=torch.bool)
    ctx[:, :2] = True  # block 0 holds a prompt and two targets
    nb = noise(x0, torch.full((256, 2), 1e-6), get_schedule("linear"), 4, MASK, context_mask=ctx,
               generator=torch.Generator().manual_seed(0), remask_prompt_blocks=remask_prompt_blocks)
    assert nb.masked[:, 4:].any(-1).all()  # the prompt-free block always is
    assert nb.masked[:, :4].any(-1).all() == remask_prompt_blocks
    assert not nb.masked[:, :2].any()
