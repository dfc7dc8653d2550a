"""The one Transformer layer every variant uses (Qwen3-style).

RMSNorm pre-norm, RoPE, grouped-query attention with optional QK-RMSNorm, SwiGLU MLP.
A layer can attend to a *prefix* of keys/values computed elsewhere (the E2D2 decoder's
clean stream, a matched encoder layer, or a KV cache), placed before its own keys.

Sampling runs a second, inference-only form of the same layer (`TransformerLayer.infer`):
batch-1 denoising steps of a few tokens are bound by the number of small ops per layer, not
by FLOPs, so it uses projection weights concatenated once per model (`FusedWeights`, cached
and rebuilt when a parameter changes), RMSNorm weights folded into them, a cheap RMSNorm
(`inference_rms`), RoPE on queries and keys at once (`RopeTables`, built once per block)
and the cache's preallocated views. `tests/test_sampling.py` checks it against the training forward.
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

    __slots__ = ("k", "v", "start", "rows", "_views")

    def __init__(self, k: torch.Tensor, v: torch.Tensor, start: int, rows: torch.Tensor | None = None):
        self.k, self.v, self.start, self.rows = k, v, start, rows
        self._views: tuple[torch.Tensor, ...] | None = None

    def extend(self, own: KV) -> KV:
        own_k, own_v = own
        if self.rows is not None:
            prefix_k, prefix_v = self.k[self.rows, :, : self.start], self.v[self.rows, :, : self.start]
            return torch.cat((prefix_k, own_k), 2), torch.cat((prefix_v, own_v), 2)
        n = own_k.shape[2]
        if self._views is None or self._views[0].shape[2] != n:  # a slot kept for a block's steps slices once
            end = self.start + n
            self._views = (self.k[:, :, self.start : end], self.v[:, :, self.start : end],
                           self.k[:, :, :end], self.v[:, :, :end])
        write_k, write_v, k, v = self._views
        write_k.copy_(own_k)
        write_v.copy_(own_v)
        return k, v


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


class RopeTables:
    """RoPE for the inference path, built once per block and shared by every layer.

    ``cos`` and ``sin`` ``[len, head_dim]`` (``[batch, 1, len, head_dim]`` for per-row
    positions), as `apply_rotary` takes them, but ``sin`` carries rotate-half's sign, so that
    rotating is ``x * cos + x.roll(head_dim / 2) * sin`` (`TransformerLayer.infer`): one op
    fewer, the same numbers.
    """

    __slots__ = ("cos", "sin")

    def __init__(self, rope: tuple[torch.Tensor, torch.Tensor], dtype: torch.dtype):
        cos, sin = (r.to(dtype) for r in rope)
        half = sin.shape[-1] // 2
        self.cos, self.sin = cos, torch.cat((-sin[..., :half], sin[..., half:]), -1)

    def rows(self, rows: torch.Tensor | None) -> RopeTables:
        if rows is None or self.cos.dim() == 2:
            return self
        out = RopeTables.__new__(RopeTables)
        out.cos, out.sin = self.cos[rows], self.sin[rows]
        return out

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """``x [batch, heads, len, head_dim]`` rotated."""
        return torch.addcmul(x * self.cos, x.roll(x.shape[-1] // 2, -1), self.sin)


def inference_rms(x: torch.Tensor, eps_term: torch.Tensor) -> torch.Tensor:
    """``x / sqrt(sum(x^2) + n * eps)`` over the last dim (size ``n``; ``eps_term``: the 0-dim
    ``sqrt(n * eps)``, see `rms_eps_term`): RMSNorm divided by ``sqrt(n)``, which the caller
    folds into the next weight. Three small ops instead of the ~20 of ``F.rms_norm``'s CPU
    composite (3x faster on a ``[4, 128]`` input)."""
    return x / torch.hypot(torch.linalg.vector_norm(x, dim=-1, keepdim=True), eps_term)


def rms_eps_term(n: int, eps: float, like: torch.Tensor) -> torch.Tensor:
    """`inference_rms`'s ``sqrt(n * eps)`` as a 0-dim tensor of ``like``'s dtype and device."""
    return torch.tensor((n * eps) ** 0.5, dtype=like.dtype, device=like.device)


def weights_key(params) -> tuple:
    """Identity, storage and version counter of each of ``params``: a cache of tensors made
    from them is stale iff this changed (an in-place update, a replaced parameter)."""
    return tuple((id(p), p.data_ptr(), p._version) for p in params)


class FusedWeights:
    """One layer's weights in the inference path's form (no autograd), made from its parameters.

    * ``qkv_t [hidden, (heads + 2 groups) * head_dim]``: q|k|v projections concatenated and
      transposed, the input RMSNorm's weight (and `inference_rms`'s ``sqrt(hidden)``) folded
      into their rows; ``kv_t``: its k|v columns;
    * ``qk_norm [heads + groups, 1, head_dim]``: the q- and k-norm weights per head, times
      ``sqrt(head_dim)`` (None without QK-norm);
    * ``o_t``, ``down_t``: the output projections transposed;
    * ``gate_up_t [hidden, 2 ffn]``: gate|up transposed, the MLP RMSNorm's weight folded in;
    * ``eps_hidden``, ``eps_head``: `rms_eps_term` of the hidden and head sizes;
    * ``heads``, ``groups``, ``head_dim``: the attention's shape (read per call, so kept here
      rather than behind ``nn.Module.__getattr__``).

    Every matrix is stored ``[in, out]`` and contiguous, for ``torch.mm``/``addmm``: CPU BLAS
    runs the few-row products of a denoising step (4 to 32 rows) 1.3-2x faster that way than
    ``F.linear``'s ``[out, in]`` weight read transposed. The results match ``F.linear``'s to
    rounding (not bitwise at 4 rows: another kernel).

    ``key`` identifies the parameters it was made from (`key_of`: object, storage and version
    counter), so a cached copy is rebuilt after any in-place update (optimizer step,
    ``load_state_dict``), a replaced parameter (``load_state_dict(assign=True)``) or a
    replaced submodule.
    """

    # The submodules whose ``weight`` it is made from, as paths of names under the layer.
    PATHS = (("input_norm",), ("attn", "q_proj"), ("attn", "k_proj"), ("attn", "v_proj"), ("attn", "o_proj"),
             ("mlp_norm",), ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))
    QK_NORM_PATHS = (("attn", "q_norm"), ("attn", "k_norm"))

    @staticmethod
    def key_of(layer: TransformerLayer) -> tuple:
        """Identity, storage and version counter of each parameter it is made from, found by
        plain dict lookups (``_modules``, ``_parameters``): walking ``layer.parameters()``, or
        attribute access through ``nn.Module.__getattr__``, costs ~20 us a layer, and the
        sampler asks once per layer and block."""
        qk_norm = isinstance(layer._modules["attn"]._modules["q_norm"], nn.RMSNorm)
        params = []
        for path in FusedWeights.PATHS + (FusedWeights.QK_NORM_PATHS if qk_norm else ()):
            module = layer
            for name in path:
                module = module._modules[name]
            params.append(module._parameters["weight"])
        return weights_key(params)

    def __init__(self, layer: TransformerLayer, key: tuple):
        attn, mlp = layer.attn, layer.mlp
        hidden = layer.input_norm.weight.shape[0]
        scale_in = layer.input_norm.weight * hidden**0.5
        scale_mlp = layer.mlp_norm.weight * hidden**0.5
        self.key = key
        qkv = torch.cat((attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight)) * scale_in
        self.qkv_t = qkv.t().contiguous()
        self.kv_t = qkv[attn.heads * attn.head_dim:].t().contiguous()
        self.qk_norm = None
        if isinstance(attn.q_norm, nn.RMSNorm):
            d = attn.head_dim
            self.qk_norm = torch.cat((attn.q_norm.weight.expand(attn.heads, 1, d),
                                      attn.k_norm.weight.expand(attn.groups, 1, d))) * d**0.5
        self.o_t = attn.o_proj.weight.t().contiguous()
        self.gate_up_t = (torch.cat((mlp.gate_proj.weight, mlp.up_proj.weight)) * scale_mlp).t().contiguous()
        self.down_t = mlp.down_proj.weight.t().contiguous()
        self.eps_hidden = rms_eps_term(hidden, layer.eps, qkv)
        self.eps_head = rms_eps_term(attn.head_dim, layer.eps, qkv)
        self.heads, self.groups, self.head_dim = attn.heads, attn.groups, attn.head_dim


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

    # The two projection hooks: a subclass may compute them differently (the engine fuses
    # them into one tensor-parallel linear), the math around them stays this class's. They
    # return heads as views, so that a fused projection's q, k and v reach the norms without
    # a copy: q ``[batch, len, groups, heads / groups, head_dim]`` (a query group's heads
    # side by side, GQA's grouping), k and v ``[batch, len, groups, head_dim]``.
    def qkv_projections(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x [batch, len, hidden]`` -> q, k and v heads (shapes above)."""
        g, d = self.groups, self.head_dim
        return (self.q_proj(x).unflatten(-1, (g, self.heads // g, d)), *self.kv_projections(x))

    def kv_projections(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k and v heads only (another stream's keys/values: no query is computed)."""
        g, d = self.groups, self.head_dim
        return self.k_proj(x).unflatten(-1, (g, d)), self.v_proj(x).unflatten(-1, (g, d))

    def core_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> torch.Tensor:
        """The hook around ``softmax(q k^T) v`` (the engine may recompute it in the backward
        pass): q ``[batch, heads, Lq, head_dim]``, k, v ``[batch, groups, Lk, head_dim]``."""
        return attend(q, k, v, mask)

    def _rotated_kv(self, k: torch.Tensor, v: torch.Tensor, rope) -> KV:
        """k, v ``[batch, len, groups, head_dim]`` -> ``[batch, groups, len, head_dim]`` each."""
        return apply_rotary(self.k_norm(k).transpose(1, 2), rope), v.transpose(1, 2)

    def project_kv(self, x: torch.Tensor, rope) -> KV:
        """Keys/values of already-normed hidden states ``x [batch, len, hidden]``."""
        return self._rotated_kv(*self.kv_projections(x), rope)

    def forward(self, x: torch.Tensor, rope, mask, prefix: KV | KVSlot | None = None) -> tuple[torch.Tensor, KV]:
        """x: normed ``[batch, len, hidden]``. Keys are ``[prefix ; own]``; a `KVSlot` prefix
        lives in a KV cache. Returns output and own K/V."""
        q, k, v = self.qkv_projections(x)
        # The norm writes a new tensor, after which the flatten is a view.
        q = apply_rotary(self.q_norm(q).flatten(2, 3).transpose(1, 2), rope)
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
        self.eps = cfg.norm_eps

    def kv(self, x: torch.Tensor, rope) -> KV:
        """This layer's keys/values for another stream ``x [batch, len, hidden]`` (e.g. ``h_enc``)."""
        return self.attn.project_kv(self.input_norm(x), rope)

    def forward(self, x: torch.Tensor, rope, mask, prefix: KV | KVSlot | None = None) -> tuple[torch.Tensor, KV]:
        """x: ``[batch, len, hidden]`` -> (``[batch, len, hidden]``, own K/V for caches)."""
        attn_out, own_kv = self.attn(self.input_norm(x), rope, mask, prefix)
        x = x + attn_out
        return x + self.mlp(self.mlp_norm(x)), own_kv

    # ------------------------------------------------------------- inference path
    def fused_weights(self) -> FusedWeights:
        """This layer's `FusedWeights`, made once and kept until a parameter changes."""
        key = FusedWeights.key_of(self)
        fused = self.__dict__.get("_fused")
        if fused is None or fused.key != key:
            with torch.no_grad():
                fused = FusedWeights(self, key)
            self.__dict__["_fused"] = fused  # a plain attribute: not a parameter, buffer or state
        return fused

    def infer(self, x: torch.Tensor, w: FusedWeights, rope: RopeTables, mask: torch.Tensor | None,
              slot: KVSlot, batch: int) -> torch.Tensor:
        """`forward` for inference (no autograd), attending ``slot``'s cached prefix and its own
        keys, which it writes to the cache as `KVSlot.extend` does.

        x: ``[batch * len, hidden]`` (flat: the layers of a step pass it on without reshaping);
        mask: ``bool[batch, 1, len, prefix + len]`` or None (all visible). Returns the same shape.
        """
        heads, groups, d = w.heads, w.groups, w.head_dim
        s = x.shape[0] // batch
        qkv = torch.mm(inference_rms(x, w.eps_hidden), w.qkv_t).view(batch, s, heads + 2 * groups, d).transpose(1, 2)
        qk, v = qkv.split_with_sizes((heads + groups, groups), 1)  # not `split`: its Python wrapper costs
        if w.qk_norm is not None:
            qk = inference_rms(qk, w.eps_head) * w.qk_norm
        q, k = rope.rotate(qk).split_with_sizes((heads, groups), 1)
        k, v = slot.extend((k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=heads != groups)
        x = torch.addmm(x, out.transpose(1, 2).reshape(x.shape[0], heads * d), w.o_t)
        gate, up = torch.mm(inference_rms(x, w.eps_hidden), w.gate_up_t).chunk(2, -1)
        return torch.addmm(x, F.silu(gate).mul_(up), w.down_t)

    def infer_kv(self, x: torch.Tensor, w: FusedWeights, rope: RopeTables) -> KV:
        """`kv` for inference: keys/values ``[batch, groups, len, head_dim]`` of ``x [batch, len,
        hidden]``, from the k|v rows of the fused weight (no query is computed)."""
        b, s, _ = x.shape
        heads, groups, d = w.heads, w.groups, w.head_dim
        kv = (inference_rms(x, w.eps_hidden) @ w.kv_t).view(b, s, 2 * groups, d).transpose(1, 2)
        k, v = kv.split_with_sizes((groups, groups), 1)
        if w.qk_norm is not None:
            k = inference_rms(k, w.eps_head) * w.qk_norm[heads:]
        return rope.rotate(k), v


def run_layers(layers, h: torch.Tensor, rope, mask, prefixes: list[KV | KVSlot | None] | None = None,
               last_kv_only: bool = False):
    """Run ``layers`` in order over ``h [batch, len, hidden]``; layer ``i`` may attend ``prefixes[i]``.

    Returns the output and every layer's own K/V (for caches and the shared-KV decoder).
    ``last_kv_only``: the last layer only projects its K/V (`VariantPlan.top_layer_kv_only`:
    nothing reads its output), and the output returned is None.
    """
    own: list[KV] = []
    for i, layer in enumerate(layers):
        if last_kv_only and i == len(layers) - 1:
            return None, [*own, layer.kv(h, rope)]
        h, kv = layer(h, rope, mask, None if prefixes is None else prefixes[i])
        own.append(kv)
    return h, own
