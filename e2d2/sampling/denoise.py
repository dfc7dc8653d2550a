"""Denoising one block: the step loop, with per-row output reuse."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from functools import partial

import torch

from e2d2.config import SamplerConfig
from e2d2.sampling.distributions import Distribution, RowStreams
from e2d2.sampling.strategies import StepTimes, denoise_step, reveal_counts

Forward = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def denoise_block(
    forward: Forward,
    x: torch.Tensor,
    cfg: SamplerConfig,
    times: list[StepTimes],
    mask_id: int,
    streams: RowStreams,
) -> tuple[torch.Tensor, int, list[int]]:
    """Denoise ``x [b, W]`` until no mask is left; returns it, the batched forwards spent and
    each row's forwards.

    ``forward(x_rows, rows)`` gives logits for the rows ``rows`` (None = all) of the block.
    A row steps while its block has a mask; it is forwarded again only if its block changed
    since its last forward. Which rows step, need a forward or changed is kept on the host
    from each row's count of masked tokens (a step only ever reveals masked tokens, so a row
    changed iff its count fell): one device sync per block, plus one per step for the
    strategies whose reveal count is not fixed in advance (`reveal_counts`).
    Profiler labels ``sample.step`` and ``sample.forward`` split a step into the model and
    the rest (``benchmarks/bench_sample.py`` measures that overhead).
    """
    batch, width = x.shape
    n_masked = (x == mask_id).sum(-1).tolist()
    n_start = list(n_masked)
    fresh = [False] * batch  # the row's distribution matches its block
    row_nfe = [0] * batch
    dist: Distribution | None = None
    calls, step = 0, 0
    while True:
        stepping = [r for r in range(batch) if n_masked[r]]
        if not stepping:
            return x, calls, row_nfe
        with _region("sample.step"):
            need = [r for r in stepping if not fresh[r]]
            if need:
                rows = _row_index(need, batch, x.device)
                with _region("sample.forward"):
                    logits = forward(x if rows is None else x[rows], rows)
                new = Distribution.of(logits, mask_id, cfg.temperature, cfg.top_p, cfg.strategy == "topk_margin")
                if dist is None or rows is None:
                    dist = new if rows is None else _scatter_new(new, rows, batch)
                else:
                    dist.update(rows, new)
                for r in need:
                    row_nfe[r] += 1
                    fresh[r] = True
                calls += 1
            rows = _row_index(stepping, batch, x.device)
            step_time = None if cfg.strategy == "first_hitting" else times[min(step, len(times) - 1)]
            n_reveal = reveal_counts(cfg.strategy, step_time, [n_start[r] for r in stepping],
                                     [n_masked[r] for r in stepping])
            new_x = denoise_step(cfg.strategy, x if rows is None else x[rows], dist.rows(rows), step_time,
                                 n_reveal, mask_id, cfg.threshold,
                                 partial(streams.uniform, width, None if rows is None else stepping))
            if n_reveal is None:
                left = (new_x == mask_id).sum(-1).tolist()
            else:
                left = [n_masked[r] - k for r, k in zip(stepping, n_reveal, strict=True)]
            for r, n in zip(stepping, left, strict=True):
                if n < n_masked[r]:
                    n_masked[r], fresh[r] = n, False
            x = new_x if rows is None else x.index_copy(0, rows, new_x)
            step += 1


def _region(name: str):
    """A profiler label, only while a profiler runs (``record_function`` costs ~6 us, two per step)."""
    return torch.profiler.record_function(name) if torch.autograd._profiler_enabled() else nullcontext()


def _row_index(rows: list[int], batch: int, device: torch.device) -> torch.Tensor | None:
    """``rows`` of a batch as an index tensor, or None when they are all of it."""
    return None if len(rows) == batch else torch.tensor(rows, device=device)


def _scatter_new(new: Distribution, rows: torch.Tensor, batch: int) -> Distribution:
    """A ``batch``-row distribution holding ``new`` at ``rows`` (the others are filled later)."""

    def grow(t):
        if t is None:
            return None
        out = t.new_zeros((batch, *t.shape[1:]))
        out[rows] = t
        return out

    top2 = None if new.top2 is None else (grow(new.top2[0]), grow(new.top2[1]))
    return Distribution(grow(new.probs), grow(new.argmax), grow(new.cdf), top2)
