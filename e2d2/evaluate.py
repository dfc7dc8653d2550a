"""Validation NELBO and perplexity bound with Monte-Carlo error."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from e2d2.diffusion import DiffusionObjective


@dataclass(frozen=True)
class NelboResult:
    nelbo: float  # nats per token, mean over sequences and draws
    std_error: float  # standard error of that mean over the Monte-Carlo draws
    perplexity: float  # exp(nelbo): an upper bound on perplexity
    sequences: int


@torch.no_grad()
def evaluate_nelbo(
    model, objective: DiffusionObjective, batches: Iterable[torch.Tensor], draws: int = 1, seed: int = 0
) -> NelboResult:
    """NELBO per token over ``batches`` of ``[batch, L]`` token ids, ``draws`` time draws each.

    A fixed seed makes repeated evaluations of the same model comparable.
    """
    was_training = model.training
    model.eval()
    gen = None
    values = []
    for x0 in batches:
        if gen is None:
            gen = torch.Generator(device=x0.device).manual_seed(seed)
        for _ in range(draws):
            values.append(objective.nelbo(model, x0, generator=gen))
    model.train(was_training)
    per_seq = torch.cat(values).double()
    mean = per_seq.mean().item()
    std_error = per_seq.std().item() / math.sqrt(per_seq.numel()) if per_seq.numel() > 1 else float("nan")
    return NelboResult(mean, std_error, math.exp(mean), per_seq.numel() // max(draws, 1))
