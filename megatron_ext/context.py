"""Context parallelism (CP): each sequence split over the ranks of megatron's CP group.

Every length-``L`` stream is cut into ``2C`` chunks of ``L / 2C`` positions (whole blocks:
``megatron_ext.layout.PipelinePlan`` refuses other lengths) and CP rank ``r`` holds chunks
``r`` and ``2C - 1 - r``: megatron's load-balanced zig-zag for causal masks. The
block-causal encoder and the BD3-LM / E2D2 decoder masks are as lopsided as a causal one,
so every rank gets the same share of visible (query, key) pairs.

* Attention: each layer all-gathers the keys and values of the CP group (``gather_kv``;
  its backward reduce-scatters their gradients) and attends with the rank's own queries.
  The mask is the full mask of ``e2d2.masks`` with this rank's query rows and the gathered
  keys' columns picked out (``ContextSplit.mask``): a dense tensor indexed for SDPA, or the
  same ``mask_mod`` read through the index maps for FlexAttention. No rule is re-derived.
* Loss: the per-token NLL of the rank's positions is all-gathered (``gather_tokens``, ``L``
  floats per sequence) into the whole sequence's, so every CP rank computes the full
  sequence loss of ``e2d2.diffusion`` (token counts included); its backward keeps the
  rank's own positions. megatron's schedule multiplies the loss by ``C`` and DDP averages
  gradients over DP x CP, which sums the ranks' partial gradients of the one loss.

The batch (``x0``, the noised fields, prompt and padding masks) stays whole on every rank,
so the noise is that of CP = 1; the model picks its positions out (``local``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

from e2d2.attention import build_mask, use_flex
from e2d2.masks import AttentionMask


def chunk_positions(seq_length: int, size: int, rank: int) -> torch.Tensor:
    """Positions ``[L / C]`` of CP rank ``rank`` of ``size`` in one stream: chunks ``rank``
    and ``2 size - 1 - rank`` of ``2 size``."""
    chunk = seq_length // (2 * size)
    return torch.cat([torch.arange(c * chunk, (c + 1) * chunk)
                      for c in (rank, 2 * size - 1 - rank)])


@functools.cache
def _positions_on(seq_length: int, size: int, rank: int, device: torch.device) -> torch.Tensor:
    """`chunk_positions` on ``device``, made once: every micro-batch slices with them."""
    return chunk_positions(seq_length, size, rank).to(device)


@functools.cache
def _position_order(seq_length: int, size: int, device: torch.device) -> torch.Tensor:
    """The permutation that puts the all-gathered ranks' positions back in sequence order."""
    order = torch.cat([chunk_positions(seq_length, size, r) for r in range(size)])
    return torch.argsort(order).to(device)


@functools.cache
def _indices(seq_length: int, size: int, rank: int, query_streams: int, key_streams: int):
    """(query rows, key columns) of the full mask for this rank: its own positions in each
    query stream, and every rank's positions in each key stream in the all-gathered order
    (rank-major, then stream, as ``gather_kv`` lays them out)."""
    def streams(r: int, n: int) -> torch.Tensor:
        own = chunk_positions(seq_length, size, r)
        return torch.cat([t * seq_length + own for t in range(n)])

    return (streams(rank, query_streams),
            torch.cat([streams(r, key_streams) for r in range(size)]))


@dataclass(frozen=True)
class ContextSplit:
    """This rank's place in the CP group (``size > 1``)."""

    size: int
    rank: int

    @staticmethod
    def current() -> ContextSplit | None:
        """This rank's split in megatron's CP group (``initialize_model_parallel`` first), or
        None without context parallelism."""
        size = parallel_state.get_context_parallel_world_size()
        return ContextSplit(size, parallel_state.get_context_parallel_rank()) if size > 1 else None

    def positions(self, seq_length: int, device: torch.device) -> torch.Tensor:
        """This rank's positions ``[L / C]`` of a stream."""
        return _positions_on(seq_length, self.size, self.rank, torch.device(device))

    def local(self, x: torch.Tensor) -> torch.Tensor:
        """``[batch, L, ...]`` -> this rank's ``[batch, L / C, ...]``."""
        return x[:, self.positions(x.shape[1], x.device)]

    def gather_tokens(self, values: torch.Tensor) -> torch.Tensor:
        """This rank's per-token values ``[batch, L / C]`` -> the whole sequence's
        ``[batch, L]`` (every rank's, in position order). Backward: the rank's own slice
        (every CP rank computes the same loss from them)."""
        gathered = gather_from_sequence_parallel_region(
            values.t().contiguous(), tensor_parallel_output_grad=False,
            group=parallel_state.get_context_parallel_group()).t()
        return gathered[:, _position_order(gathered.shape[1], self.size, values.device)]

    def mask(self, spec: AttentionMask, seq_length: int, block_size: int, device: torch.device,
             batch_size: int, context: torch.Tensor | None, padding: torch.Tensor | None):
        """``spec``'s full mask (``e2d2.attention.build_mask``'s form) restricted to this
        rank's query rows and to the all-gathered key columns (``gather_kv``'s order)."""
        rows, cols = _indices(seq_length, self.size, self.rank, spec.query_streams, spec.key_streams)
        device = torch.device(device)
        if not use_flex(device):
            full = build_mask(spec, seq_length, block_size, device, batch_size, context, padding)
            return full[..., rows.to(device)[:, None], cols.to(device)]
        if context is None and padding is None:
            return _static_block_mask(spec, seq_length, block_size, self, device)
        return _block_mask(spec, seq_length, block_size, self, device, batch_size, context, padding)


def _block_mask(spec: AttentionMask, seq_length: int, block_size: int, split: ContextSplit,
                device: torch.device, batch_size: int | None = None, context=None, padding=None):
    """FlexAttention ``BlockMask`` of ``spec``'s own ``mask_mod`` read at this rank's query
    rows and the gathered key columns."""
    from torch.nn.attention.flex_attention import create_block_mask

    rows, cols = (i.to(device) for i in _indices(seq_length, split.size, split.rank,
                                                 spec.query_streams, spec.key_streams))
    mod = spec.mask_mod(seq_length, block_size, context, padding, device)

    def local_mod(b, h, q, k):
        return mod(b, h, rows[q], cols[k])

    batched = context is not None or padding is not None
    return create_block_mask(local_mod, B=batch_size if batched else None, H=None,
                             Q_LEN=len(rows), KV_LEN=len(cols), device=device)


_static_block_mask = functools.lru_cache(maxsize=32)(_block_mask)


def gather_kv(x: torch.Tensor) -> torch.Tensor:
    """Keys or values ``[batch, groups, len, head_dim]`` of this rank -> the CP group's
    ``[batch, groups, C x len, head_dim]`` (rank-major). Backward: reduce-scatter."""
    gathered = gather_from_sequence_parallel_region(
        x.permute(2, 0, 1, 3).contiguous(), tensor_parallel_output_grad=True,
        group=parallel_state.get_context_parallel_group())
    return gathered.permute(1, 2, 0, 3)
