"""Validation NELBO and perplexity bound, with its two sources of error reported apart."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from e2d2.diffusion import DiffusionObjective

Batch = torch.Tensor | Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class NelboResult:
    """NELBO per token over a validation set, ``draws`` Monte-Carlo time draws per sequence.

    * ``std_error``: Monte-Carlo error: the standard error of ``nelbo`` as an estimate of the
      exact NELBO of *these* sequences, from the spread of each sequence's draws
      (``sqrt(mean_i var_i / (N draws))``); NaN with one draw, where it cannot be told apart.
    * ``sequence_std_error``: between-sequence error: the standard error over sequences of
      their mean NELBO (``std_i / sqrt(N)``), what another sample of the data would change;
      it contains the Monte-Carlo noise of each sequence's mean.
    """

    nelbo: float  # nats per token, mean over sequences and draws
    std_error: float
    sequence_std_error: float
    perplexity: float  # exp(nelbo): an upper bound on perplexity
    sequences: int  # sequences with at least one counted token
    draws: int


def _fields(batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        return batch, None, None
    unknown = set(batch) - {"x0", "attention_mask", "context_mask"}
    if "x0" not in batch or unknown:
        raise ValueError(f"an evaluation batch is a [batch, L] tensor of token ids or a mapping with "
                         f"'x0' and optional 'attention_mask', 'context_mask'; got keys {sorted(batch)}")
    return batch["x0"], batch.get("attention_mask"), batch.get("context_mask")


@torch.no_grad()
def evaluate_nelbo(
    model, objective: DiffusionObjective, batches: Iterable[Batch], draws: int = 1, seed: int = 0
) -> NelboResult:
    """NELBO per token over ``batches``, ``draws`` time draws for each sequence.

    A batch is ``x0 [batch, L]`` or a mapping with ``x0`` and optional ``attention_mask``
    (1 = real) and ``context_mask`` (1 = prompt): pads and prompt tokens are no targets, and
    each sequence's NELBO is per counted token (spec 4). Sequences without a counted token
    are left out. A fixed seed makes repeated evaluations of the same model comparable.
    """
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    was_training = model.training
    model.eval()
    gen, rows = None, []
    for batch in batches:
        x0, attention_mask, context_mask = _fields(batch)
        if gen is None:
            gen = torch.Generator(device=x0.device).manual_seed(seed)
        per_draw = [objective.nelbo(model, x0, attention_mask, context_mask, generator=gen) for _ in range(draws)]
        counted = objective.loss_mask(x0, attention_mask, context_mask).any(-1)
        rows.append(torch.stack(per_draw, 1)[counted].double())  # [sequences, draws]
    model.train(was_training)
    values = torch.cat(rows) if rows else torch.zeros(0, draws, dtype=torch.float64)
    n = values.shape[0]
    if n == 0:
        raise ValueError("no sequence has a token to evaluate (all padding or prompt)")
    mean = values.mean().item()
    mc = (values.var(1).mean() / (n * draws)).sqrt().item() if draws > 1 else float("nan")
    between = values.mean(1).std().item() / math.sqrt(n) if n > 1 else float("nan")
    return NelboResult(mean, mc, between, math.exp(mean), n, draws)


def token_weighted_nelbo(nats: torch.Tensor, tokens: torch.Tensor, exact: bool = False) -> NelboResult:
    """NELBO per token over sequences of unequal lengths: total nats over total tokens.

    ``nats [n, draws]``: each draw's NELBO of sequence ``i`` in nats (not per token);
    ``tokens [n]``: its counted tokens; sequences without one are left out. ``exact`` (AR):
    one exact column, Monte-Carlo error 0. The errors of this ratio: Monte-Carlo
    ``sqrt(sum_i var_i / draws) / T``; between sequences, the ratio estimator's
    ``sqrt(n / (n - 1) sum_i (m_i - r t_i)^2) / T`` (``m_i`` the draws' mean, ``r`` the
    NELBO, ``T`` the total tokens), which is ``std_i / sqrt(n)`` for equal lengths.
    """
    keep = tokens > 0
    nats, tokens = nats[keep].double(), tokens[keep].double()
    n, draws = nats.shape
    if n == 0:
        raise ValueError("no sequence has a token to evaluate (all padding or prompt)")
    total = tokens.sum()
    means = nats.mean(1)
    nelbo = (means.sum() / total).item()
    if exact:
        mc = 0.0
    else:
        mc = (nats.var(1).sum() / draws).sqrt().item() / total.item() if draws > 1 else float("nan")
    residual = means - nelbo * tokens
    between = ((residual**2).sum() * n / (n - 1)).sqrt().item() / total.item() if n > 1 else float("nan")
    return NelboResult(nelbo, mc, between, math.exp(min(nelbo, 700.0)), n, draws)
