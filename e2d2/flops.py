"""Analytic FLOPs of every variant, for MFU and the paper's efficiency claims (spec section 6).

Conventions:

* One multiply-add is 2 FLOPs. Only matmuls are counted (projections, MLP, LM head, and the
  two attention matmuls ``QK^T`` and ``AV``); norms, RoPE, softmax and SwiGLU's elementwise
  product are O(hidden) per token and left out, as profilers and MFU conventions do.
* Attention is counted twice: *dense* (every query against every key the kernel is given,
  what ``torch.utils.flop_counter`` and a dense-mask SDPA kernel do) and *masked* (only the
  (query, key) pairs the mask allows, what a block-sparse kernel needs and what MFU uses).
* Training backward = 2x forward (grad of inputs + grad of weights), so training = 3x forward.
* Shared-KV's top encoder layer feeds the decoder only through its K/V
  (`VariantPlan.top_layer_kv_only`): the models run only its K/V projections, in training
  and in the sampler's clean passes, and that is what is counted.
* Per-token training counts divide by the ``L`` tokens of ``x0`` (BD3-LM's 2L stack still
  trains L tokens).

Sampling (spec section 5) is counted per generated token of one sequence, as
`e2d2.sampling.sample` runs it: prompt prefill, then for every block ``steps_per_block``
denoiser forwards (E2D2: the decoder only; BD3-LM: the whole stack; both with the block's
``S`` queries against the cached clean keys and the block) and one clean pass that appends
the block to the KV cache (E2D2: the encoder). MDLM has no block cache: each step runs the
whole stack over prompt + completion.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

from e2d2 import masks
from e2d2.config import ModelConfig

H100_BF16_DENSE_PEAK_FLOPS = 989e12  # NVIDIA H100 SXM, bf16 tensor cores, no sparsity


@dataclass(frozen=True)
class FlopsCount:
    """A FLOPs count split by where it goes.

    ``linear``: Q/K/V/O projections and the MLP. ``lm_head``: the vocabulary projection.
    ``attention_dense``: ``QK^T`` and ``AV`` over every (query, key) pair the kernel is given.
    ``attention_masked``: the same over the pairs the mask allows.
    """

    linear: float = 0.0
    lm_head: float = 0.0
    attention_dense: float = 0.0
    attention_masked: float = 0.0

    @property
    def dense(self) -> float:
        """Total with dense attention: what a profiler counts and a dense-mask kernel computes."""
        return self.linear + self.lm_head + self.attention_dense

    @property
    def masked(self) -> float:
        """Total with only the visible attention pairs: the useful work that MFU uses."""
        return self.linear + self.lm_head + self.attention_masked

    def __add__(self, other: FlopsCount) -> FlopsCount:
        return FlopsCount(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def __sub__(self, other: FlopsCount) -> FlopsCount:
        return self + (-1.0) * other

    def __mul__(self, k: float) -> FlopsCount:
        return FlopsCount(*(getattr(self, f.name) * k for f in fields(self)))

    __rmul__ = __mul__

    def __truediv__(self, k: float) -> FlopsCount:
        return self * (1.0 / k)


def mfu(
    tokens_per_s: float, flops_per_token: float, peak_flops: float = H100_BF16_DENSE_PEAK_FLOPS
) -> float:
    """Model FLOPs utilization: achieved FLOP/s over the hardware peak (a fraction in [0, 1])."""
    return tokens_per_s * flops_per_token / peak_flops


# ------------------------------------------------------------------ mask densities
def visible_pairs(mask: masks.AttentionMask, seq_len: int, block_size: int) -> int:
    """Number of ``True`` entries of ``mask.dense(seq_len, block_size)``, in closed form.

    Closed form because the dense mask of a long sequence (BD3-LM: ``[2L, 2L]``) is too big to
    materialize just to count it. ``n = L // S`` blocks of ``S`` tokens:
    block-causal keeps ``S^2 n(n+1)/2`` pairs, offset block-causal ``S^2 n(n-1)/2``,
    block-diagonal ``S^2 n``.
    """
    L, S = seq_len, block_size
    n = L // S
    block_causal = S * S * n * (n + 1) // 2
    offset_block_causal = S * S * n * (n - 1) // 2
    block_diagonal = S * S * n
    pairs = {
        masks.E2D2_ENCODER.name: block_causal,
        masks.E2D2_DECODER.name: offset_block_causal + block_diagonal,
        masks.BD3LM.name: block_causal + offset_block_causal + block_diagonal,
        masks.MDLM.name: L * L,
        masks.AR.name: L * (L + 1) // 2,
    }
    if mask.name not in pairs:
        raise ValueError(f"no closed form for mask {mask.name!r}")
    return pairs[mask.name]


def mask_density(mask: masks.AttentionMask, seq_len: int, block_size: int) -> float:
    """Fraction of the dense ``[Lq, Lk]`` mask that may attend (e.g. block-causal ~ 1/2)."""
    lq, lk = mask.shape(seq_len)
    return visible_pairs(mask, seq_len, block_size) / (lq * lk)


# ------------------------------------------------------------------ building blocks
def _projections_per_token(cfg: ModelConfig) -> float:
    """One layer's Q/K/V/O projections for one token: ``2 * (weights touched)``."""
    d = cfg.hidden_size
    q, kv = cfg.num_attention_heads * cfg.kv_channels, cfg.num_query_groups * cfg.kv_channels
    return 2.0 * (d * q + 2 * d * kv + q * d)


def _mlp_per_token(cfg: ModelConfig) -> float:
    """One layer's SwiGLU (gate, up, down) for one token."""
    return 2.0 * 3 * cfg.hidden_size * cfg.ffn_hidden_size


def _linear_per_token(cfg: ModelConfig) -> float:
    """One layer's projections and MLP for one token."""
    return _projections_per_token(cfg) + _mlp_per_token(cfg)


def _kv_per_token(cfg: ModelConfig) -> float:
    """K and V projections alone for one token (E2D2 decoder layers projecting ``h_enc``)."""
    return 2.0 * 2 * cfg.hidden_size * cfg.num_query_groups * cfg.kv_channels


def _stack(cfg: ModelConfig, layers: int, queries: int, keys: int, visible: int) -> FlopsCount:
    """``layers`` full layers over ``queries`` tokens, each attending ``keys`` keys densely, of
    which ``visible`` (query, key) pairs in total are allowed by the mask.

    Attention runs on every query head (GQA shares K/V, not the score matmuls): ``QK^T`` and
    ``AV`` are ``2 * heads * head_dim`` FLOPs per pair each.
    """
    per_pair = 4.0 * cfg.num_attention_heads * cfg.kv_channels
    return FlopsCount(
        linear=layers * queries * _linear_per_token(cfg),
        attention_dense=layers * queries * keys * per_pair,
        attention_masked=layers * visible * per_pair,
    )


def _head(cfg: ModelConfig, tokens: int) -> FlopsCount:
    return FlopsCount(lm_head=2.0 * tokens * cfg.hidden_size * cfg.vocab_size)


def _kv_of_clean(cfg: ModelConfig, tokens: int) -> FlopsCount:
    """E2D2 last-hidden: each decoder layer projects K/V of ``h_enc`` (shared-KV reuses the
    encoder's)."""
    n = cfg.num_decoder_layers if cfg.plan.own_decoder_kv else 0
    return FlopsCount(linear=n * tokens * _kv_per_token(cfg))


# ------------------------------------------------------------------ training
@dataclass(frozen=True)
class LayerCosts:
    """Forward FLOPs of one training sequence, per piece a pipeline stage can hold.

    ``layer``: one layer of the main stack (E2D2: one encoder layer); ``top_layer``: its top
    layer, the same except for shared-KV (K/V projections only). ``decoder_layer``: one
    E2D2 decoder layer, with its K/V projection of ``h_enc`` (zero for single-stack variants).
    ``embedding``: the token lookup, a gather with no matmul, so zero under this module's
    conventions (kept so that placement names every piece). ``head``: final norm, LM head
    and loss; only the vocabulary projection is a matmul.
    """

    layer: FlopsCount
    decoder_layer: FlopsCount
    embedding: FlopsCount
    head: FlopsCount
    top_layer: FlopsCount


@dataclass(frozen=True)
class ModuleCosts:
    """Forward FLOPs of one training sequence per module of a layer (what a per-module
    profiler sees): ``attention`` and ``mlp`` of a main-stack (E2D2: encoder) layer (the
    attention's Q/K/V/O projections and its two matmuls), ``decoder_attention`` (with the
    K/V projection of ``h_enc``) and ``decoder_mlp`` of an E2D2 decoder layer (zero for
    single-stack variants), ``head`` the LM head. ``top_attention`` and ``top_mlp``: the main
    stack's top layer, the same as the others except shared-KV's (K/V projections only, no
    MLP). ``layer_costs`` sums them per layer."""

    attention: FlopsCount
    decoder_attention: FlopsCount
    mlp: FlopsCount
    decoder_mlp: FlopsCount
    head: FlopsCount
    top_attention: FlopsCount
    top_mlp: FlopsCount


def module_costs(cfg: ModelConfig, seq_len: int | None = None) -> ModuleCosts:
    """Per-module forward FLOPs of one sequence of ``seq_len`` tokens (``DiffusionLM.forward``)."""
    L, S, plan = seq_len or cfg.seq_length, cfg.block_size, cfg.plan

    def attention(queries: int, keys: int, visible: int) -> FlopsCount:
        stack = _stack(cfg, 1, queries, keys, visible)
        return stack - FlopsCount(linear=queries * _mlp_per_token(cfg))

    def mlp(tokens: int) -> FlopsCount:
        return FlopsCount(linear=tokens * _mlp_per_token(cfg))

    n = len(plan.main_streams) * L  # the main stack's tokens (BD3-LM: [x0 ; xt])
    main = attention(n, n, visible_pairs(plan.main_mask, L, S))
    if not plan.has_decoder:  # logits only for the predicted stream
        return ModuleCosts(main, FlopsCount(), mlp(n), FlopsCount(), _head(cfg, L), main, mlp(n))
    decoder = attention(L, 2 * L, visible_pairs(plan.decoder_mask, L, S))
    if plan.own_decoder_kv:  # K/V of h_enc (shared-KV reuses the encoder's)
        decoder += FlopsCount(linear=L * _kv_per_token(cfg))
    top, top_mlp = main, mlp(L)
    if plan.top_layer_kv_only:
        top, top_mlp = FlopsCount(linear=L * _kv_per_token(cfg)), FlopsCount()
    return ModuleCosts(main, decoder, mlp(L), mlp(L), _head(cfg, L), top, top_mlp)


def layer_costs(cfg: ModelConfig, seq_len: int | None = None) -> LayerCosts:
    """Per-layer forward FLOPs of one sequence of ``seq_len`` tokens (``DiffusionLM.forward``)."""
    m = module_costs(cfg, seq_len)
    return LayerCosts(m.attention + m.mlp, m.decoder_attention + m.decoder_mlp, FlopsCount(),
                      m.head, m.top_attention + m.top_mlp)


def forward_flops_per_sequence(cfg: ModelConfig, seq_len: int | None = None) -> FlopsCount:
    """One training forward (``DiffusionLM.forward``) of one sequence of ``seq_len`` tokens."""
    costs = layer_costs(cfg, seq_len)
    return ((cfg.num_layers - 1) * costs.layer + costs.top_layer
            + cfg.num_decoder_layers * costs.decoder_layer + costs.embedding + costs.head)


def forward_flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> FlopsCount:
    """Forward FLOPs per training token (per token of ``x0``)."""
    L = seq_len or cfg.seq_length
    return forward_flops_per_sequence(cfg, L) / L


def training_flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> FlopsCount:
    """Forward + backward FLOPs per training token (backward = 2x forward)."""
    return 3 * forward_flops_per_token(cfg, seq_len)


# ------------------------------------------------------------------ sampling
def sampling_flops_per_token(
    cfg: ModelConfig,
    prompt_length: int,
    new_tokens: int,
    steps_per_block: float | Sequence[float],
    block_size: int | None = None,
) -> FlopsCount:
    """FLOPs per generated token of one sequence, as `e2d2.sampling.sample` spends them.

    ``steps_per_block``: denoiser forwards (NFE) per block, one number for every block or the
    sequence's own count per block (a row of the sampler's ``row_nfe``). A list shorter than
    the budget's blocks is a run that stopped early (EOS, stop string): only those blocks are
    counted, and only the tokens they generated. Follows the sampler's layout: the prompt's
    whole blocks are prefilled once (reading the tail too when the model reads prompts
    bidirectionally); its tail opens the first generated block; the last block is not encoded
    (nothing follows it). MDLM is one block over prompt + completion, without cache. AR: one
    cached forward per token after the prompt's prefill. ``block_size``: the sampler's.
    """
    if cfg.plan.autoregressive:
        return _ar_sampling(cfg, prompt_length, new_tokens)
    if cfg.plan.decoding == "whole_sequence":
        total = prompt_length + new_tokens
        starts, S, prefill = [0], total, FlopsCount()
    else:
        S = block_size or cfg.block_size
        n_ctx = prompt_length - prompt_length % S
        starts = list(range(n_ctx, prompt_length + new_tokens, S))
        prefill = _prefill(cfg, n_ctx, prompt_length, S)
    per_block = isinstance(steps_per_block, Sequence)
    steps = list(steps_per_block) if per_block else [steps_per_block] * len(starts)
    if not 1 <= len(steps) <= len(starts):
        raise ValueError(f"steps_per_block has {len(steps)} entries for at most {len(starts)} blocks")
    generated = min(prompt_length + new_tokens, starts[len(steps) - 1] + S) - prompt_length
    total_flops = prefill
    for j, (start, t) in enumerate(zip(starts, steps, strict=False)):
        total_flops += t * _denoise(cfg, start, S)
        if j < len(steps) - 1:
            total_flops += _commit(cfg, start, S)
    return total_flops / generated


def _ar_sampling(cfg: ModelConfig, P: int, new_tokens: int) -> FlopsCount:
    """AR: the prompt's causal prefill (logits of its last token only), then one cached
    forward per generated token but the last (whose successor is not needed)."""
    total = _stack(cfg, cfg.num_layers, P, P, visible_pairs(masks.AR, P, 1)) + _head(cfg, 1)
    for i in range(new_tokens - 1):
        keys = P + i + 1
        total += _stack(cfg, cfg.num_layers, 1, keys, keys) + _head(cfg, 1)
    return total / new_tokens


def _prefill(cfg: ModelConfig, n_ctx: int, P: int, S: int) -> FlopsCount:
    """``model.encode(prompt)``: the clean stack over the ``n_ctx`` whole-block tokens,
    block-causal, or over all ``P`` prompt tokens, fully visible, when prompts are read
    bidirectionally (the whole blocks read the tail)."""
    if n_ctx == 0:
        return FlopsCount()
    if cfg.prompt_is_bidirectional:
        return _clean_pass(cfg, P, P, P * P)
    return _clean_pass(cfg, n_ctx, n_ctx, visible_pairs(masks.E2D2_ENCODER, n_ctx, S))


def _denoise(cfg: ModelConfig, start: int, S: int) -> FlopsCount:
    """One denoiser forward on the block ``[start, start + S)``.

    Cached variants see every cached clean key and the block itself (no mask: dense ==
    masked); E2D2 runs only its decoder. MDLM has no cache: a full bidirectional forward over
    everything so far (``start == 0``, the block is prompt + completion).
    """
    keys = start + S
    if cfg.plan.decoding == "whole_sequence":
        return _stack(cfg, cfg.num_layers, keys, keys, keys * keys) + _head(cfg, keys)
    layers = cfg.num_decoder_layers if cfg.plan.has_decoder else cfg.num_layers
    return _stack(cfg, layers, S, keys, S * keys) + _head(cfg, S)


def _commit(cfg: ModelConfig, start: int, S: int) -> FlopsCount:
    """``model.encode(block)``: the clean pass that appends a finished block to the cache."""
    keys = start + S
    return _clean_pass(cfg, S, keys, S * keys)


def _clean_pass(cfg: ModelConfig, queries: int, keys: int, visible: int) -> FlopsCount:
    """``model.encode``: the main stack over ``queries`` clean tokens (shared-KV's top layer
    projects only their K/V), and E2D2 last-hidden's decoder K/V of ``h_enc``."""
    if cfg.plan.top_layer_kv_only:
        stack = (_stack(cfg, cfg.num_layers - 1, queries, keys, visible)
                 + FlopsCount(linear=queries * _kv_per_token(cfg)))
    else:
        stack = _stack(cfg, cfg.num_layers, queries, keys, visible)
    return stack + _kv_of_clean(cfg, queries)
