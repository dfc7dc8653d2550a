"""The conditional ELBO of lm-eval requests (`e2d2.likelihood`): a bound where the truth is
known by enumeration, AR exact, and no leak of the continuation's clean tokens."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from e2d2.config import DiffusionConfig, ModelConfig
from e2d2.diffusion import DiffusionObjective
from e2d2.likelihood import request_generator, score_rows
from e2d2.model import DiffusionLM

V, MASK, L, S = 10, 9, 12, 4
CONTEXT = 6  # a prompt ending mid-block: block 1 holds 2 context and 2 continuation tokens
VARIANTS = {
    "e2d2": dict(variant="e2d2", num_layers=2, num_decoder_layers=1),
    "e2d2_shared_kv": dict(variant="e2d2_shared_kv", num_layers=2, num_decoder_layers=1),
    "bd3lm": dict(variant="bd3lm", num_layers=2, num_decoder_layers=0),
    "mdlm": dict(variant="mdlm", num_layers=2, num_decoder_layers=0),
    "e2d2_shift": dict(variant="e2d2", num_layers=2, num_decoder_layers=1, shift=True),
}


def _model(name: str, seed: int = 0) -> DiffusionLM:
    cfg = ModelConfig(vocab_size=V, mask_token_id=MASK, hidden_size=32, ffn_hidden_size=64,
                      num_attention_heads=4, num_query_groups=2, seq_length=L, block_size=S,
                      init_std=0.5, **VARIANTS[name])  # large weights: peaked, varied predictions
    return DiffusionLM(cfg, seed=seed).double().eval()


def _row(length: int = 10):
    g = torch.Generator().manual_seed(3)
    x0 = torch.randint(0, MASK, (1, L), generator=g)
    real = torch.arange(L)[None] < length  # 2 pads after the continuation
    context = torch.arange(L)[None] < CONTEXT
    return x0, context, real


def _exact(model: DiffusionLM, x0, context, real, S_: int):
    """(exact NLL, expected NELBO) of the continuation by enumeration. Within a block the
    continuous-time reverse process unmasks the scored tokens in a uniformly random order,
    each drawn from the denoiser given the tokens unmasked so far (the denoiser takes no
    time), the blocks before it clean: the block's likelihood is the mean over orders of the
    products. The NELBO's expectation is the mean over orders of the log-products."""
    nll, nelbo = 0.0, 0.0
    scored = (real & ~context)[0].nonzero()[:, 0].tolist()
    shifted = model.cfg.shift
    for b in sorted({i // S_ for i in scored}):
        here = [i for i in scored if i // S_ == b]
        logp = {}  # (frozenset unmasked, position) -> log p(x0[position] | that state)
        for k in range(len(here)):
            for unmasked in itertools.combinations(here, k):
                xt = x0.clone()
                xt[0, [i for i in here if i not in unmasked]] = MASK
                out = model(x0, xt, real, context).double()
                out[..., MASK] = float("-inf")
                lp = out.log_softmax(-1)[0]
                for i in here:
                    if i not in unmasked:
                        logp[frozenset(unmasked), i] = lp[i, x0[0, i]].item()
        orders = []
        for order in itertools.permutations(here):
            orders.append(sum(logp[frozenset(order[:k]), order[k]] for k in range(len(order))))
        nll -= math.log(sum(math.exp(o) for o in orders) / len(orders))
        nelbo -= sum(orders) / len(orders)
        assert not shifted or 0 not in here
    return nll, nelbo


@pytest.mark.parametrize("schedule", ["linear", pytest.param("cosine", marks=pytest.mark.slow),
                                      pytest.param("log", marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_monte_carlo_elbo_bounds_the_exact_conditional_likelihood(name, schedule):
    model = _model(name)
    objective = DiffusionObjective(model.cfg, DiffusionConfig(schedule=schedule))
    x0, context, real = _row()
    exact_nll, expected_nelbo = _exact(model, x0, context, real, model.cfg.diffusion_block_size)
    draws = 2048  # the linear weight 1/t gives heavy tails: many draws for a fair SE
    scored = score_rows(model, objective, x0, context, real, draws, [request_generator("req", name)])
    estimate = -scored.loglikelihood.item()
    se = scored.std_error.item()
    assert expected_nelbo >= exact_nll  # Jensen: the bound holds for the exact expectation
    assert estimate >= exact_nll - 4 * se
    # unbiased for the any-order NELBO (up to the times below sampling_eps: ~1e-3 x NLL)
    assert abs(estimate - expected_nelbo) <= 4 * se + 2e-3 * expected_nelbo
    assert expected_nelbo - exact_nll > 1e-3  # a real gap: the check above can fail


def test_ar_loglikelihood_is_the_exact_sum_of_token_log_probabilities():
    cfg = ModelConfig(variant="ar", vocab_size=V, mask_token_id=MASK, hidden_size=32,
                      ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2,
                      seq_length=L, block_size=S, num_layers=2, num_decoder_layers=0)
    model = DiffusionLM(cfg, seed=0).double().eval()
    objective = DiffusionObjective(cfg, DiffusionConfig())
    x0, context, real = _row()
    scored = score_rows(model, objective, x0, context, real, 8, [request_generator("r")])
    assert scored.nats.shape == (1, 1) and scored.std_error.item() == 0.0
    expected = 0.0
    for i in range(CONTEXT, 10):  # each scored token given only the tokens before it
        prefix = x0[:, :i]
        expected += model(prefix).log_softmax(-1)[0, -1, x0[0, i]].item()
    assert scored.loglikelihood.item() == pytest.approx(expected, abs=1e-9)


class _Recorder(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, *args):
        self.calls.append(args)
        return self.model(*args)


@pytest.mark.parametrize("name", ["e2d2", "e2d2_shared_kv", "bd3lm", "e2d2_shift"])
def test_continuation_tokens_never_see_themselves(name):
    """Prompt ending mid-block: perturbing the clean continuation tokens of blocks >= b leaves
    the logits of block b that the estimate (and is_greedy) uses unchanged."""
    model = _model(name)
    recorder = _Recorder(model)
    objective = DiffusionObjective(model.cfg, DiffusionConfig())
    x0, context, real = _row()
    score_rows(recorder, objective, x0, context, real, 4, [request_generator("leak")])
    scored = real & ~context
    for X, xt, A, C in recorder.calls:
        reference = model(X, xt, A, C)
        for b in range(CONTEXT // S, L // S):
            later = scored[0] & (torch.arange(L) >= b * S)
            perturbed = X.clone()
            perturbed[:, later] = (perturbed[:, later] + 1) % MASK
            out = model(perturbed, xt, A, C)
            block = slice(b * S, (b + 1) * S)
            assert torch.equal(out[:, block], reference[:, block]), b


def test_draws_depend_on_the_request_only():
    model = _model("e2d2")
    objective = DiffusionObjective(model.cfg, DiffusionConfig())
    x0, context, real = _row()
    alone = score_rows(model, objective, x0, context, real, 16, [request_generator("a")])
    other = torch.randint(0, MASK, (1, L), generator=torch.Generator().manual_seed(9))
    both = score_rows(model, objective, torch.cat([other, x0]), context.repeat(2, 1),
                      real.repeat(2, 1), 16, [request_generator("b"), request_generator("a")])
    torch.testing.assert_close(both.nats[1], alone.nats[0], rtol=0, atol=1e-12)
