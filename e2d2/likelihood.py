"""Conditional likelihood of a continuation given a context, for lm-evaluation-harness requests.

A request is one row ``x0 [L]``: a start token, the context (clean, a prompt: the training-time
``context_mask``), the continuation (the scored tokens), then padding (``attention_mask`` 0).

* Diffusion variants: the negative ELBO of the continuation given the context, in nats,
  estimated with ``draws`` Monte-Carlo draws. Each block holding continuation tokens gets one
  time per draw, stratified over the draws (antithetic: one uniform ``u_b`` per block, draw
  ``d`` takes ``(u_b + d / draws) mod 1``); its continuation tokens are masked with
  probability ``1 - alpha(t)`` and weighted by ``-alpha'(t) / (1 - alpha(t))`` (spec 4).
  In expectation this is the any-order autoregressive NLL of the continuation, block by
  block, which is >= the model's exact NLL (Jensen): ``-nelbo`` is a lower bound estimate of
  the log-likelihood. Times start at ``objective.sampling_eps`` (as the run's NELBO does),
  which leaves out at most ``sampling_eps`` times the continuation's NLL with one token masked.
* AR: the exact sum of the continuation's next-token log-probabilities.

The draws of a request come from its own generator (``request_generator``), so a request's
estimate does not depend on the other rows of its batch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from e2d2.diffusion import DiffusionObjective, elbo_weight, stratified_times, token_nll


@dataclass(frozen=True)
class ScoredRows:
    """Per-row results. ``nats [n, draws]``: each draw's NLL estimate of the scored tokens
    (AR: one exact column); ``greedy [n]``: whether every scored token is the argmax of its
    prediction with all scored tokens masked (AR: teacher-forced next-token argmax); None
    when not asked for (a diffusion model's costs a second forward)."""

    nats: torch.Tensor
    greedy: torch.Tensor | None

    @property
    def loglikelihood(self) -> torch.Tensor:
        """``-mean`` over draws: ``[n]`` float64."""
        return -self.nats.double().mean(1)

    @property
    def std_error(self) -> torch.Tensor:
        """Monte-Carlo standard error of ``loglikelihood`` (0 for one exact column): the
        draws' spread over sqrt(draws), conservative for stratified draws. ``[n]``."""
        n = self.nats.shape[1]
        if n == 1:
            return torch.zeros(self.nats.shape[0], dtype=torch.float64)
        return self.nats.double().std(1) / n**0.5


def request_generator(*parts: str | int) -> torch.Generator:
    """A generator seeded from the request's content alone (sha256 of its parts)."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    words = np.frombuffer(digest, dtype=np.uint32).tolist()
    return torch.Generator().manual_seed(int(np.random.SeedSequence(words).generate_state(1)[0]))


def block_times(draws: int, n_blocks: int, generator: torch.Generator, eps: float) -> torch.Tensor:
    """``[draws, n_blocks]``: per block one uniform, stratified over the draws."""
    u = torch.rand(1, n_blocks, generator=generator)
    return stratified_times(u, torch.arange(draws)[:, None], draws, eps)


@torch.no_grad()
def score_rows(model, objective: DiffusionObjective, x0: torch.Tensor, context_mask: torch.Tensor,
               attention_mask: torch.Tensor, draws: int,
               generators: Sequence[torch.Generator], greedy: bool = True) -> ScoredRows:
    """NLL estimates of the scored tokens (real, not context) of each right-padded row ``x0 [n, L]`` (CPU
    tensors; the model may be elsewhere), with ``draws`` Monte-Carlo draws from
    ``generators[i]`` for row ``i`` (module docstring)."""
    cfg = objective.model_cfg
    counted = objective.loss_mask(x0, attention_mask, context_mask)
    device = next(model.parameters()).device
    if cfg.plan.autoregressive:
        x0, attention_mask, counted = x0.to(device), attention_mask.to(device), counted.to(device)
        logp = model(x0, attention_mask=attention_mask).double().log_softmax(-1)[:, :-1]
        taken = logp.gather(-1, x0[:, 1:, None])[..., 0]
        nats = -(taken * counted[:, 1:]).sum(-1, keepdim=True)
        greedy = ((logp.argmax(-1) == x0[:, 1:]) | ~counted[:, 1:]).all(-1)
        return ScoredRows(nats.cpu(), greedy.cpu())
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    n, L = x0.shape
    S = cfg.diffusion_block_size
    rep = lambda t: t.repeat_interleave(draws, 0)  # noqa: E731 - row i's draws are rows i*draws..
    xt, masked = rep(x0).clone(), torch.zeros(n * draws, L, dtype=torch.bool)
    weight = torch.zeros(n * draws, L, dtype=torch.float64)
    for i in range(n):
        # Noise drawn at the row's own width (its real tokens, in whole blocks), so the
        # stream of random numbers does not depend on the batch's padding.
        w = -(-int(attention_mask[i].sum()) // S) * S
        nb = objective.noise(x0[i : i + 1, :w].expand(draws, w),
                             attention_mask[i : i + 1, :w].expand(draws, w),
                             context_mask[i : i + 1, :w].expand(draws, w), train=False,
                             generator=generators[i],
                             times=block_times(draws, w // S, generators[i], objective.sampling_eps))
        rows = slice(i * draws, (i + 1) * draws)
        xt[rows, :w], masked[rows, :w], weight[rows, :w] = nb.xt, nb.masked, elbo_weight(nb).double()
    xt, masked, weight = xt.to(device), masked.to(device), weight.to(device)
    X, A, C = (rep(t).to(device) for t in (x0, attention_mask, context_mask))
    nll = token_nll(model(X, xt, A, C), X, cfg.mask_token_id)
    nats = (nll.double() * weight * masked).sum(-1).view(n, draws)
    if not greedy:
        return ScoredRows(nats.cpu(), None)
    # is_greedy: every scored token masked at once (each block given the clean blocks before it)
    all_masked = torch.where(counted, torch.full_like(x0, cfg.mask_token_id), x0)
    logits = model(*(t.to(device) for t in (x0, all_masked, attention_mask, context_mask))).float()
    logits[..., cfg.mask_token_id] = float("-inf")
    return ScoredRows(nats.cpu(), ((logits.argmax(-1).cpu() == x0) | ~counted).all(-1))
