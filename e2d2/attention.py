"""Attention backend selection: FlexAttention (block-sparse) on CUDA, SDPA with a dense mask on CPU.

Masks themselves live in `e2d2.masks`; this module only turns a mask definition into
whatever the backend needs and runs the kernel.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F

from e2d2.masks import AttentionMask

try:
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # pragma: no cover - torch < 2.5
    BlockMask, flex_attention = None, None

Mask = "torch.Tensor | BlockMask | None"


_SDPA_ONLY = False


def use_flex(device: torch.device) -> bool:
    return device.type == "cuda" and flex_attention is not None and not _SDPA_ONLY


@contextlib.contextmanager
def sdpa_only():
    """Inside it, masks are built dense and attention runs through SDPA even on CUDA: the
    reference path that FlexAttention is checked against (``benchmarks/gpu_check.py``)."""
    global _SDPA_ONLY
    previous, _SDPA_ONLY = _SDPA_ONLY, True
    try:
        yield
    finally:
        _SDPA_ONLY = previous


def build_mask(
    spec: AttentionMask,
    seq_len: int,
    block_size: int,
    device: torch.device,
    batch_size: int | None = None,
    context: torch.Tensor | None = None,
    padding: torch.Tensor | None = None,
):
    """The mask in the form the backend on ``device`` wants: a BlockMask on CUDA, dense bool on CPU.

    Without ``context`` and ``padding`` the mask depends only on ``(spec, seq_len,
    block_size)``, so it is built once and reused (``static_mask``): a training run then
    pays for ``create_block_mask`` once per mask instead of once per micro-batch. An annealed
    mask (``spec.anneal < 1``) changes every step: ``annealed_mask`` keeps only the latest
    few, so that a step builds each once for all its micro-batches without pushing the
    static masks out of their cache.
    """
    device = torch.device(device)
    if context is None and padding is None:
        cached = static_mask if spec.anneal >= 1 else annealed_mask
        return cached(spec, seq_len, block_size, device, use_flex(device))
    if use_flex(device):
        return spec.block_mask(seq_len, block_size, batch_size, context, padding, device=device)
    return spec.dense(seq_len, block_size, context, padding, device=device)


@functools.lru_cache(maxsize=32)
def static_mask(spec: AttentionMask, seq_len: int, block_size: int, device: torch.device,
                flex: bool):
    """The batch-independent mask, cached: a BlockMask (``flex``) broadcast over the batch,
    or ``bool[Lq, Lk]``. Callers must not modify it (nothing here does)."""
    if flex:
        return spec.block_mask(seq_len, block_size, None, device=device)
    return spec.dense(seq_len, block_size, device=device)


# One step's annealed masks (encoder and decoder, on up to two chunks of this rank).
annealed_mask = functools.lru_cache(maxsize=4)(static_mask.__wrapped__)


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> torch.Tensor:
    """Grouped-query attention.

    q: ``[batch, heads, Lq, head_dim]``; k, v: ``[batch, groups, Lk, head_dim]``;
    mask: ``bool[Lq, Lk]``, ``bool[batch, Lq, Lk]``, a FlexAttention BlockMask, or None (all visible).
    Returns ``[batch, heads, Lq, head_dim]``.
    """
    if BlockMask is not None and isinstance(mask, BlockMask):
        if torch.is_autocast_enabled(q.device.type):
            # FlexAttention is not an autocast op, and fp32 RoPE tables promote q and k to
            # fp32 while v stays bf16: cast all three as autocast casts SDPA's inputs.
            dtype = torch.get_autocast_dtype(q.device.type)
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        return _compiled_flex()(q, k, v, block_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
    if mask is not None and mask.dim() == 3:
        mask = mask[:, None]  # broadcast over heads
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
