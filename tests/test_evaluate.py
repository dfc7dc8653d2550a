"""evaluate_nelbo: pads and prompts are no targets; Monte-Carlo and between-sequence errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from e2d2.config import DiffusionConfig, ModelConfig
from e2d2.diffusion import DiffusionObjective
from e2d2.evaluate import evaluate_nelbo

V, MASK, L = 20, 19, 16
CFG = ModelConfig(vocab_size=V, mask_token_id=MASK, seq_length=L, block_size=4)


class KnowsRows(nn.Module):
    """Predicts x0 exactly where ``known`` is set, uniformly elsewhere; ignores the masks it is
    given, so only the evaluator's bookkeeping decides what counts."""

    def __init__(self, known: torch.Tensor):
        super().__init__()
        self.known = known
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x0, xt, attention_mask=None, context_mask=None):
        sure = torch.nn.functional.one_hot(x0, V).double() * 50.0
        return torch.where(self.known[..., None], sure, torch.zeros_like(sure))


def test_pads_and_prompts_are_not_targets():
    x0 = torch.randint(0, MASK, (64, L))
    real = torch.ones(64, L, dtype=torch.bool)
    real[:, -5:] = False
    prompt = torch.zeros(64, L, dtype=torch.bool)
    prompt[:, :3] = True
    model = KnowsRows(real & ~prompt)  # perfect on the targets, clueless on pads and prompts
    objective = DiffusionObjective(CFG, DiffusionConfig())
    batch = {"x0": x0, "attention_mask": real, "context_mask": prompt}
    honest = evaluate_nelbo(model, objective, [batch], draws=2)
    assert honest.nelbo < 1e-6
    blind = evaluate_nelbo(model, objective, [x0], draws=2)
    assert blind.nelbo > 1.0
    with pytest.raises(ValueError, match="mapping with 'x0'"):
        evaluate_nelbo(model, objective, [{"tokens": x0}])


def test_monte_carlo_and_between_sequence_errors_are_reported_apart():
    n, long = 200, 64  # long sequences: a draw's noise is small against the sequences' spread
    objective = DiffusionObjective(CFG.replace(seq_length=long), DiffusionConfig())
    x0 = torch.randint(0, MASK, (n, long), generator=torch.Generator().manual_seed(0))
    # Every sequence alike: the spread of sequence means is Monte-Carlo noise only.
    alike = evaluate_nelbo(KnowsRows(torch.zeros(n, long, dtype=torch.bool)), objective, [x0], draws=8)
    assert 0.8 < alike.sequence_std_error / alike.std_error < 1.25
    assert alike.draws == 8 and alike.sequences == n
    # Half the sequences perfectly known: the sequences differ far more than the draws do.
    half = torch.zeros(n, long, dtype=torch.bool)
    half[::2] = True
    mixed = evaluate_nelbo(KnowsRows(half), objective, [x0], draws=8)
    assert mixed.sequence_std_error > 2 * mixed.std_error
    one = evaluate_nelbo(KnowsRows(half), objective, [x0], draws=1)
    assert one.std_error != one.std_error  # NaN: one draw cannot separate the two


def test_sequences_without_targets_are_left_out():
    objective = DiffusionObjective(CFG, DiffusionConfig())
    x0 = torch.randint(0, MASK, (8, L))
    prompt = torch.zeros(8, L, dtype=torch.bool)
    prompt[:4] = True  # four rows are all prompt
    res = evaluate_nelbo(KnowsRows(torch.zeros(8, L, dtype=torch.bool)), objective,
                         [{"x0": x0, "context_mask": prompt}], draws=2)
    assert res.sequences == 4
