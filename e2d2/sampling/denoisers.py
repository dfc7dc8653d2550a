"""The block run's bookkeeping and its three denoisers: KV-cached, KV-cached with shift, and
the uncached training forward (the reference the cache is tested against)."""

from __future__ import annotations

import torch

from e2d2.config import SamplerConfig
from e2d2.model import DiffusionLM, KVCache
from e2d2.sampling.outputs import stop_lengths


class BlockRun:
    """Shared bookkeeping of a block run: rows, their prompts, output, stopping."""

    def __init__(self, model: DiffusionLM, prompt: torch.Tensor, plens: torch.Tensor,
                 cfg: SamplerConfig, S: int):
        self.model, self.cfg, self.S = model, cfg, S
        device = prompt.device
        self.plens = plens
        self.tail = plens % S
        self.n_ctx = plens - self.tail
        self.budget_end = plens + cfg.max_new_tokens  # each row's last position, exclusive
        self.n_blocks = -(-(self.tail + cfg.max_new_tokens) // S)  # [B]
        self.blocks_of = self.n_blocks.tolist()  # the same on the host
        width = int((self.n_ctx + self.n_blocks * S).max())
        self.seq = torch.full((prompt.shape[0], width), model.cfg.mask_token_id, dtype=torch.long, device=device)
        self.seq[:, :prompt.shape[1]] = prompt
        self.seq[torch.arange(width, device=device)[None, :] >= plens[:, None]] = model.cfg.mask_token_id
        self.lengths = self.budget_end.clone()
        self.finished = torch.zeros_like(plens, dtype=torch.bool)

    def finish_block(self, act: torch.Tensor, rows: list[int], j: int, decode) -> list[bool]:
        """Record stops after block ``j``; returns which of ``act`` (on the host: ``rows``) go on."""
        more = [self.blocks_of[r] > j + 1 for r in rows]
        if self.cfg.eos_token_id is None and not self.cfg.stop_strings:
            return more  # nothing stops a row before its budget
        start = torch.maximum(self.n_ctx[act] + j * self.S, self.plens[act])
        end = torch.minimum(self.n_ctx[act] + (j + 1) * self.S, self.budget_end[act])
        stop = stop_lengths(self.seq[act], self.plens[act], start, end, self.cfg, decode)
        stopped = stop >= 0
        self.lengths[act] = torch.where(stopped, stop, self.lengths[act])
        self.finished[act] = stopped
        return [go and not halt for go, halt in zip(more, stopped.tolist(), strict=True)]


class CachedDenoiser:
    """Clean prefix kept as a left-padded KV cache; a step runs only ``model.denoise`` on the block."""

    def __init__(self, run: BlockRun):
        self.run, model, S = run, run.model, run.S
        mcfg = model.cfg
        self.bidirectional = mcfg.prompt_is_bidirectional
        max_ctx = int(run.n_ctx.max())
        capacity = max_ctx + int(run.n_blocks.max()) * S
        if run.cfg.sliding_window:
            capacity = min(capacity, mcfg.seq_length)
        self.cache: KVCache = model.new_cache(len(run.plens), capacity, max_ctx - run.n_ctx)
        self.tail = run.tail
        self._constants_of: torch.Tensor | None = None
        self._prefill(max_ctx)

    def _prefill(self, max_ctx: int) -> None:
        """Encode the prompts' whole blocks; with a bidirectional prompt they also read the tail."""
        run, S, cache = self.run, self.S, self.cache
        if max_ctx == 0:
            return  # no whole block to keep: a tail is encoded with its block
        width = max_ctx + (int(self.tail.max()) if self.bidirectional else 0)
        col = torch.arange(width, device=run.seq.device)
        pos = col[None, :] - cache.offset[:, None]  # [B, width]
        real = (pos >= 0) & (pos < run.plens[:, None])
        tokens = run.seq.gather(1, pos.clamp(0, run.seq.shape[1] - 1)).masked_fill(~real, 0)
        if self.bidirectional:
            mask = real[:, None, :].expand(-1, width, -1)
        else:
            mask = real[:, None, :] & (col[None, None, :] // S <= col[None, :, None] // S)
        mask = mask | ((col[:, None] == col[None, :]) & ~real[:, :, None])  # pads see themselves
        run.model.encode(tokens, cache, pos.clamp(min=0), mask, keep=max_ctx)

    @property
    def S(self) -> int:
        return self.run.S

    def _offset_constants(self) -> tuple[torch.Tensor, bool]:
        """``arange(S) - offset [b, S]`` and whether any row is padded, made again only when the
        cache's offsets change (rows dropped, a sliding window moved)."""
        offset = self.cache.offset
        if self._constants_of is not offset:
            self._constants = (torch.arange(self.S, device=offset.device) - offset[:, None], bool((offset > 0).any()))
            self._constants_of = offset
        return self._constants

    def positions(self) -> torch.Tensor:
        """RoPE positions of the current block of every working row: ``[b, S]``."""
        return self._offset_constants()[0] + self.cache.length

    def _visible(self) -> torch.Tensor | None:
        """``bool[b, S, length + S]``: cached columns at or past each row's offset, and the block."""
        if not self._offset_constants()[1]:
            return None
        col = torch.arange(self.cache.length + self.S, device=self.cache.offset.device)
        return (col[None, :] >= self.cache.offset[:, None])[:, None, :].expand(-1, self.S, -1)

    def _begin(self, j: int) -> None:
        """Block ``j``'s positions, visibility mask and RoPE tables (its steps' and its commit's)."""
        cfg, cache = self.run.cfg, self.cache
        if cfg.sliding_window and cache.length + self.S > self.run.model.cfg.seq_length:
            mcfg = self.run.model.cfg
            cache.drop_oldest(self.S, mcfg.kv_channels, mcfg.rope_theta)
        self._positions, self._mask = self.positions(), self._visible()
        self._rope = self.run.model.rope_tables(self._positions)

    def start_block(self, j: int) -> None:
        self._begin(j)
        self._forward = self.run.model.block_forward(self.cache, self._positions, self._mask, rope=self._rope)

    def __call__(self, x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        return (self._forward if rows is None else self._forward.select(rows))(x)

    def commit(self, block: torch.Tensor, j: int) -> None:
        mask = self._mask
        if j == 0 and self.bidirectional and bool((self.tail > 0).any()):
            # the tail is context: in training its queries read context keys only
            if mask is None:
                mask = torch.ones(block.shape[0], self.S, self.cache.length + self.S, dtype=torch.bool,
                                  device=block.device)
            i = torch.arange(self.S, device=block.device)
            tail_q = i[None, :, None] < self.tail[:, None, None]  # [b, S, 1]
            own_k = torch.arange(self.cache.length + self.S, device=block.device) - self.cache.length
            own_non_ctx = own_k[None, None, :] >= self.tail[:, None, None]  # a key of the block past the tail
            mask = mask & ~(tail_q & own_non_ctx)
        self.run.model.encode(block, self.cache, self._positions, mask, rope=self._rope)

    def select(self, rows: torch.Tensor) -> None:
        """Keep batch ``rows`` (between a block's steps and its commit; the next block's
        forward is made at its start)."""
        self.cache = self.cache.select(rows)
        self.tail = self.tail[rows]
        self._positions = self._positions[rows]
        self._mask = None if self._mask is None else self._mask[rows]
        self._rope = self._rope.rows(rows)
        self._forward = None


class ShiftedCachedDenoiser(CachedDenoiser):
    """The cached denoiser of a model with ``shift`` (`e2d2.shift`): block ``j`` at positions
    ``[start, start + S)`` is denoised through the window ``[x0[start - 1], block[:S - 1]]``
    at positions ``[start - 1, start + S - 1)``, whose slot ``i`` predicts block token ``i``;
    the window sees the cached columns before ``start - 1`` (the last one it holds itself).
    A row with nothing cached (its first block starts at 0, the prompt's first token revealed
    in it) has a dummy first slot that no other slot sees."""

    def __init__(self, run: BlockRun):
        super().__init__(run)
        self.act = torch.arange(len(run.plens), device=run.plens.device)  # rows of run.seq

    def start_block(self, j: int) -> None:
        self._begin(j)
        cache, S = self.cache, self.S
        start = self.run.n_ctx[self.act] + j * S
        self._prev = self.run.seq[self.act, (start - 1).clamp(min=0)]  # [b]
        self._positions_window = (self._positions - 1).clamp(min=0)
        col = torch.arange(cache.length + S, device=start.device)
        empty = cache.offset == cache.length  # no cached column: slot 0 is a dummy
        cached = (col[None, :] >= cache.offset[:, None]) & (col[None, :] < cache.length - 1)
        own = (col[None, :] >= cache.length) & ~(empty[:, None] & (col[None, :] == cache.length))
        mask = (cached | own)[:, None, :].repeat(1, S, 1)
        mask[:, 0, cache.length] |= empty  # the dummy query sees itself
        self._window_mask = mask
        self._forward = self.run.model.block_forward(cache, self._positions_window, mask)

    def __call__(self, x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        prev = self._prev if rows is None else self._prev[rows]
        window = torch.cat((prev[:, None], x[:, :-1]), 1)
        return (self._forward if rows is None else self._forward.select(rows))(window)

    def select(self, rows: torch.Tensor) -> None:
        super().select(rows)
        self.act = self.act[rows]


class FullDenoiser:
    """No cache: each row runs the training forward (with its prompt as context mask) on its
    prefix and block, alone. The reference the cache is tested against."""

    def __init__(self, run: BlockRun):
        self.run = run
        self.act = torch.arange(len(run.plens), device=run.plens.device)

    def start_block(self, j: int) -> None:
        self.j = j

    def __call__(self, x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        run, S = self.run, self.run.S
        rows = torch.arange(x.shape[0], device=x.device) if rows is None else rows
        out = []
        for i, r in enumerate(self.act[rows].tolist()):
            start = int(run.n_ctx[r]) + self.j * S
            tokens = torch.cat((run.seq[r, :start], x[i]))[None]
            context = torch.arange(start + S, device=x.device)[None] < run.plens[r]
            out.append(run.model(tokens, tokens, context_mask=context, block_size=S)[:, start:])
        return torch.cat(out)

    def commit(self, block: torch.Tensor, j: int) -> None:
        pass  # the run's position-indexed sequence already holds the block

    def select(self, rows: torch.Tensor) -> None:
        self.act = self.act[rows]
