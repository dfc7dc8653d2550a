"""The one Transformer layer every variant uses (Qwen3-style).

RMSNorm pre-norm, RoPE, grouped-query attention with optional QK-RMSNorm, SwiGLU MLP.
A layer can attend to a *prefix* of keys/values computed elsewhere (the E2D2 decoder's
clean stream, a matched encoder layer, or a KV cache), placed before its own keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from e2d2.attention import attend
from e2d2.config import ModelConfig

KV = tuple[torch.Tensor, torch.Tensor]  # ([batch, groups, len, head_dim], same)


class KVSlot:
    """A layer's place in a preallocated KV cache (`e2d2.model.KVCache`).

    ``k, v``: the layer's buffers ``[batch, groups, capacity, head_dim]``, columns
    ``[0, start)`` filled. The layer writes its own K/V for ``n`` new tokens to columns
    ``[start, start + n)`` and attends columns ``[0, start + n)``: views, so no step copies
    the prefix. Writing is harmless for a denoising step (the columns stay unclaimed until a
    commit overwrites them). With ``rows``, only those batch rows run: their prefix is copied
    and nothing is written.
    """

    __slots__ = ("k", "v", "start", "rows")

    def __init__(self, k: torch.Tensor, v: torch.Tensor, start: int, rows: torch.Tensor | None = None):
        self.k, self.v, self.start, self.rows = k, v, start, rows

    def extend(self, own: KV) -> KV:
        own_k, own_v = own
        if self.rows is not None:
            prefix_k, prefix_v = self.k[self.rows, :, : self.start], self.v[self.rows, :, : self.start]
            return torch.cat((prefix_k, own_k), 2), torch.cat((prefix_v, own_v), 2)
        end = self.start + own_k.shape[2]
        self.k[:, :, self.start : end] = own_k
        self.v[:, :, self.start : end] = own_v
        return self.k[:, :, :end], self.v[:, :, :end]


def rotary(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``[len, head_dim]`` for integer ``positions [len]`` (rotate-half layout).
    Negative positions are fine: they rotate backwards (`e2d2.model.KVCache.drop_oldest`)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """x: ``[batch, heads, len, head_dim]``; cos/sin ``[len, head_dim]``, or ``[batch, 1, len,
    head_dim]`` for per-row positions."""
    cos, sin = (r.to(x.dtype) for r in rope)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, h, g = cfg.kv_channels, cfg.num_attention_heads, cfg.num_query_groups
        self.heads, self.groups, self.head_dim = h, g, d
        self.q_proj = nn.Linear(cfg.hidden_size, h * d, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, g * d, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, g * d, bias=False)
        self.o_proj = nn.Linear(h * d, cfg.hidden_size, bias=False)
        self.q_norm = nn.RMSNorm(d, eps=cfg.norm_eps) if cfg.qk_layernorm else nn.Identity()
        self.k_norm = nn.RMSNorm(d, eps=cfg.norm_eps) if cfg.qk_layernorm else nn.Identity()

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        b, s, _ = x.shape
        return x.view(b, s, n, self.head_dim).transpose(1, 2)

    # The two projection hooks: a subclass may compute them differently (the engine fuses
    # them into one tensor-parallel linear), the math around them stays this class's.
    def qkv_projections(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x [batch, len, hidden]`` -> flat q ``[batch, len, heads * head_dim]``, k and v
        ``[batch, len, groups * head_dim]``."""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def kv_projections(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat k and v only (another stream's keys/values: no query is computed)."""
        return self.k_proj(x), self.v_proj(x)

    def core_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> torch.Tensor:
        """The hook around ``softmax(q k^T) v`` (the engine may recompute it in the backward
        pass): q ``[batch, heads, Lq, head_dim]``, k, v ``[batch, groups, Lk, head_dim]``."""
        return attend(q, k, v, mask)

    def _rotated_kv(self, k: torch.Tensor, v: torch.Tensor, rope) -> KV:
        return apply_rotary(self.k_norm(self._heads(k, self.groups)), rope), self._heads(v, self.groups)

    def project_kv(self, x: torch.Tensor, rope) -> KV:
        """Keys/values of already-normed hidden states ``x [batch, len, hidden]``."""
        return self._rotated_kv(*self.kv_projections(x), rope)

    def forward(self, x: torch.Tensor, rope, mask, prefix: KV | KVSlot | None = None) -> tuple[torch.Tensor, KV]:
        """x: normed ``[batch, len, hidden]``. Keys are ``[prefix ; own]``; a `KVSlot` prefix
        lives in a KV cache. Returns output and own K/V."""
        q, k, v = self.qkv_projections(x)
        q = apply_rotary(self.q_norm(self._heads(q, self.heads)), rope)
        own = self._rotated_kv(k, v, rope)
        if isinstance(prefix, KVSlot):
            k, v = prefix.extend(own)
        elif prefix is None:
            k, v = own
        else:
            k, v = torch.cat((prefix[0], own[0]), 2), torch.cat((prefix[1], own[1]), 2)
        out = self.core_attention(q, k, v, mask)
        b, _, s, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1)), own


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.ffn_hidden_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.ffn_hidden_size, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_hidden_size, cfg.hidden_size, bias=False)

    def gate_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The projection hook (fused in the engine): ``x [batch, len, hidden]`` -> gate and
        up, each ``[batch, len, ffn]``."""
        return self.gate_proj(x), self.up_proj(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x)
        return self.down_proj(F.silu(gate) * up)


class TransformerLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def kv(self, x: torch.Tensor, rope) -> KV:
        """This layer's keys/values for another stream ``x [batch, len, hidden]`` (e.g. ``h_enc``)."""
        return self.attn.project_kv(self.input_norm(x), rope)

    def forward(self, x: torch.Tensor, rope, mask, prefix: KV | KVSlot | None = None) -> tuple[torch.Tensor, KV]:
        """x: ``[batch, len, hidden]`` -> (``[batch, len, hidden]``, own K/V for caches)."""
        attn_out, own_kv = self.attn(self.input_norm(x), rope, mask, prefix)
        x = x + attn_out
        return x + self.mlp(self.mlp_norm(x)), own_kv


def run_layers(layers, h: torch.Tensor, rope, mask, prefixes: list[KV | KVSlot | None] | None = None):
    """Run ``layers`` in order over ``h [batch, len, hidden]``; layer ``i`` may attend ``prefixes[i]``.

    Returns the output and every layer's own K/V (for caches and the shared-KV decoder).
    """
    own: list[KV] = []
    for i, layer in enumerate(layers):
        h, kv = layer(h, rope, mask, None if prefixes is None else prefixes[i])
        own.append(kv)
    return h, own
