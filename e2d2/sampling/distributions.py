"""Per-row random streams, and the distribution one forward gives each block position."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


def draw_dtype(device: torch.device) -> torch.dtype:
    """The dtype of the sampler's uniforms and of the CDF they are searched in.

    float32 on CPU: torch's CPU ``cumsum`` accumulates float32 in double, so a float32 CDF is
    the exact one rounded once per entry (a token's chance is off by at most ~1 ulp, ~6e-8),
    and the float32 scan dispatches 1 op where a float64 one converts first (4 more; ~10% of a
    batch-1 step's sampler time). float64 elsewhere: CUDA's scan accumulates in float32, whose
    error over a 150k vocabulary would reach the rare tokens' probabilities."""
    return torch.float32 if device.type == "cpu" else torch.float64


class RowStreams:
    """One random generator per row; draws ``[rows, n]`` uniforms (`draw_dtype`), each row from its own.

    ``widths``: how many of the ``n`` columns each row really has (MDLM's ragged rows): a row
    draws only those, so its stream does not depend on the batch's widest row; the rest is
    filled with 0.5 (those positions are never masked).
    """

    def __init__(self, generators: list[torch.Generator], device: torch.device,
                 widths: list[int] | None = None):
        self.generators, self.device, self.widths = generators, device, widths
        self.dtype = draw_dtype(device)

    @classmethod
    def seeded(cls, seeds: Sequence[int], device: torch.device) -> RowStreams:
        return cls([torch.Generator(device=device).manual_seed(int(s)) for s in seeds], device)

    def select(self, rows: list[int]) -> RowStreams:
        widths = None if self.widths is None else [self.widths[i] for i in rows]
        return RowStreams([self.generators[i] for i in rows], self.device, widths)

    def uniform(self, n: int, rows: list[int] | None = None) -> torch.Tensor:
        idx = range(len(self.generators)) if rows is None else rows
        if self.widths is None and len(idx) == 1:  # batch 1: no stacking
            return torch.rand(1, n, generator=self.generators[idx[0]], device=self.device, dtype=self.dtype)
        draws = []
        for i in idx:
            w = n if self.widths is None else self.widths[i]
            u = torch.rand(w, generator=self.generators[i], device=self.device, dtype=self.dtype)
            draws.append(u if w == n else torch.cat((u, u.new_full((n - w,), 0.5))))
        return torch.stack(draws)



@dataclass
class Distribution:
    """What one forward gives each position of a block, kept while the block is unchanged.

    ``probs [b, S, vocab]`` (``[MASK]`` excluded, temperature applied), which confidences read;
    greedy: ``argmax [b, S]``; sampling: the ``cdf [b, S, vocab]`` (`draw_dtype`) values are drawn
    from, top-p filtered (computed once per forward, not per step); ``top2`` probabilities and
    ids for the margin strategy.
    """

    probs: torch.Tensor
    argmax: torch.Tensor | None = None
    cdf: torch.Tensor | None = None
    top2: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def of(cls, logits: torch.Tensor, mask_id: int, temperature: float, top_p: float,
           margin: bool) -> Distribution:
        """From a forward's ``logits [b, S, vocab]``, which it overwrites (the sampler's own)."""
        # ``logits`` is the sampler's own fresh forward output: the mask logit is set in place
        if logits.dtype != torch.float32:  # a skipped no-op is one dispatch less per step
            logits = logits.float()
        if temperature not in (0.0, 1.0):
            logits = logits / temperature
        logits.select(-1, mask_id).fill_(-math.inf)  # not ``logits[..., mask_id] =``: one op fewer
        probs = logits.softmax(-1)
        top2 = probs.topk(2, dim=-1) if margin else None
        if temperature == 0:
            return cls(probs, argmax=probs.argmax(-1), top2=top2)
        values_from = nucleus(probs, top_p) if top_p < 1.0 else probs
        return cls(probs, cdf=values_from.cumsum(-1, dtype=draw_dtype(probs.device)), top2=top2)

    def rows(self, rows: torch.Tensor | None) -> Distribution:
        if rows is None:
            return self

        def pick(t):
            return None if t is None else t[rows]

        top2 = None if self.top2 is None else (self.top2[0][rows], self.top2[1][rows])
        return Distribution(self.probs[rows], pick(self.argmax), pick(self.cdf), top2)

    def update(self, rows: torch.Tensor, new: Distribution) -> None:
        self.probs[rows] = new.probs
        for name in ("argmax", "cdf"):
            if getattr(self, name) is not None:
                getattr(self, name)[rows] = getattr(new, name)
        if self.top2 is not None:
            self.top2[0][rows], self.top2[1][rows] = new.top2


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches ``top_p``; renormalize."""
    sorted_p, order = probs.sort(-1, descending=True)
    before = sorted_p.cumsum(-1) - sorted_p  # mass of the more likely tokens
    keep_sorted = before < top_p
    keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
    kept = probs * keep
    return kept / kept.sum(-1, keepdim=True)
