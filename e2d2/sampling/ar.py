"""Autoregressive sampling (the AR baseline): one token per forward, with a left-padded KV cache."""

from __future__ import annotations

import torch

from e2d2.sampling.distributions import Distribution
from e2d2.sampling.outputs import SampleOutput, make_output, stop_lengths


def sample_ar(model, prompt, plens, cfg, streams, decode) -> SampleOutput:
    """Next-token sampling, one forward per token, with a left-padded KV cache (or without)."""
    mask_id, device = model.cfg.mask_token_id, plens.device
    batch, max_p = len(plens), int(plens.max())
    width = max_p + cfg.max_new_tokens
    seq = torch.full((batch, width), mask_id, dtype=torch.long, device=device)
    seq[:, :prompt.shape[1]] = prompt
    lengths, finished = plens + cfg.max_new_tokens, torch.zeros(batch, dtype=torch.bool, device=device)
    act = torch.arange(batch, device=device)
    step = _ARCached(model, seq, plens, width) if cfg.use_cache else _ARFull(model, seq, plens)
    logits = step.first()
    for i in range(cfg.max_new_tokens):
        dist = Distribution.of(logits[:, None], mask_id, cfg.temperature, cfg.top_p, False)
        if dist.cdf is None:
            tok = dist.argmax[:, 0]
        else:
            u = streams.uniform(1)
            tok = torch.searchsorted(dist.cdf[:, 0], u * dist.cdf[:, 0, -1:], right=True)[:, 0]
        at = plens[act] + i
        seq[act, at] = tok
        stop = stop_lengths(seq[act], plens[act], at, at + 1, cfg, decode)
        stopped = stop >= 0
        lengths[act] = torch.where(stopped, stop, lengths[act])
        finished[act] = stopped
        if i == cfg.max_new_tokens - 1 or bool(stopped.all()):
            break
        if bool(stopped.any()):
            keep = (~stopped).nonzero().squeeze(1)
            act, tok, streams = act[keep], tok[keep], streams.select(keep.tolist())
            step.select(keep)
        logits = step.next(tok, i)
    n = int((lengths - plens).max())
    return make_output(model, seq, plens, lengths, finished, cfg, [1] * n,
                   ((lengths - plens)[:, None] > torch.arange(n, device=device)).long())


class _ARCached:
    def __init__(self, model, seq, plens, capacity):
        self.model, self.plens = model, plens
        max_p = int(plens.max())
        self.cache = model.new_cache(len(plens), capacity, max_p - plens)
        col = torch.arange(max_p, device=plens.device)
        pos = col[None, :] - self.cache.offset[:, None]
        real = pos >= 0
        self.tokens = seq.gather(1, pos.clamp(min=0)).masked_fill(~real, 0)
        self.pos = pos.clamp(min=0)
        causal = col[None, :] <= col[:, None]
        self.mask = (causal[None] & real[:, None, :]) | (torch.eye(max_p, dtype=torch.bool, device=plens.device)[None])
        self.act = torch.arange(len(plens), device=plens.device)

    def first(self) -> torch.Tensor:
        h = self.model.encode(self.tokens, self.cache, self.pos, self.mask)
        return self.model.logits(h[:, -1])

    def next(self, tok: torch.Tensor, i: int) -> torch.Tensor:
        cache = self.cache
        mask = None
        if bool((cache.offset > 0).any()):
            col = torch.arange(cache.length + 1, device=tok.device)
            mask = (col[None, :] >= cache.offset[:, None])[:, None, :]
        pos = (self.plens[self.act] + i)[:, None]
        h = self.model.encode(tok[:, None], cache, pos, mask)
        return self.model.logits(h[:, -1])

    def select(self, rows):
        self.cache, self.act = self.cache.select(rows), self.act[rows]


class _ARFull:
    def __init__(self, model, seq, plens):
        self.model, self.seq, self.plens = model, seq, plens
        self.act = torch.arange(len(plens), device=plens.device)

    def _logits(self, i: int) -> torch.Tensor:
        out = []
        for r in self.act.tolist():
            tokens = self.seq[r, : int(self.plens[r]) + i][None]
            out.append(self.model(tokens)[:, -1])
        return torch.cat(out)

    def first(self) -> torch.Tensor:
        return self._logits(0)

    def next(self, tok: torch.Tensor, i: int) -> torch.Tensor:
        return self._logits(i + 1)  # seq already holds tok

    def select(self, rows):
        self.act = self.act[rows]
