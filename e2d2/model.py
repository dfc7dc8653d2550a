"""The reference model of every variant, in plain PyTorch (spec section 3).

This is the single-process source of truth: the megatron-core engine must match its loss
and gradients, and sampling and the Hugging Face export run on it.

Parameter names (the megatron conversion maps these):

* ``embed.weight``                 token embedding ``[vocab, hidden]`` (shared by encoder and decoder)
* ``layers.{i}.*``                 main stack: the E2D2 encoder, or the single stack of a baseline
* ``encoder_norm.weight``          E2D2 last-hidden only: norm producing ``h_enc``
* ``decoder_layers.{k}.*``         E2D2 decoder (absent when shared-KV ties it to the encoder)
* ``norm.weight``                  final norm before the LM head
* ``lm_head.weight``               absent when ``tie_word_embeddings``

Layer parameters: ``input_norm``, ``attn.{q,k,v,o}_proj``, ``attn.{q,k}_norm``, ``mlp_norm``,
``mlp.{gate,up,down}_proj`` (bias-free, like Qwen3).

Shared-KV reads only the K/V of its top encoder layer (`VariantPlan.top_layer_kv_only`), so
that layer runs ``input_norm``, ``k_proj``, ``v_proj`` and ``k_norm`` only. Unless the decoder
is tied to it, its ``q_proj``, ``q_norm``, ``o_proj``, ``mlp_norm`` and ``mlp.*`` are unused
and get no gradient (as before this layer's work was skipped: autograd pruned it); they stay
in the state dict so that every layer has the same tensors (checkpoints, the Hugging Face
export and import of a causal LM, whose top layer uses them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from e2d2.attention import build_mask
from e2d2.config import ModelConfig
from e2d2.init import initialize_, seed_from_global_rng
from e2d2.layers import (
    KV,
    KVSlot,
    RopeTables,
    TransformerLayer,
    apply_rotary,
    inference_rms,
    rms_eps_term,
    rotary,
    run_layers,
    weights_key,
)
from e2d2.masks import AttentionMask, for_model
from e2d2.shift import align_logits, noisy_input


@dataclass
class KVCache:
    """Preallocated clean-stream keys/values for sampling, one row per sequence.

    ``layers[i]``: main-stack layer ``i``'s K/V; ``decoder[k]``: E2D2 last-hidden only,
    decoder layer ``k``'s K/V of ``h_enc``. Each is a pair of buffers ``[batch, groups,
    capacity, head_dim]`` allocated once, so appending never copies what is cached.
    Columns ``[0, length)`` are filled. Rows are *left-padded*: row ``r``'s position ``p``
    sits in column ``p + offset[r]``, so rows with prompts of different lengths fill the
    same columns at every step; callers mask columns below ``offset`` out.
    """

    layers: list[KV]
    decoder: list[KV]
    offset: torch.Tensor  # [batch], long
    length: int = 0

    @property
    def capacity(self) -> int:
        return self.layers[0][0].shape[2]

    def slots(self, which: list[KV], rows: torch.Tensor | None = None) -> list[KVSlot]:
        return [KVSlot(k, v, self.length, rows) for k, v in which]

    def select(self, rows: torch.Tensor) -> KVCache:
        """Keep only batch ``rows`` (sequences that stopped are dropped)."""

        def pick(kv: KV) -> KV:
            return kv[0].index_select(0, rows), kv[1].index_select(0, rows)

        return KVCache([pick(kv) for kv in self.layers], [pick(kv) for kv in self.decoder],
                       self.offset.index_select(0, rows), self.length)

    def drop_oldest(self, n: int, head_dim: int, rope_theta: float) -> None:
        """Drop the oldest ``n`` columns (a sliding window). Rows whose real tokens start at
        column 0 lose them and are re-based: their cached keys are rotated back by ``n``
        positions (RoPE scores depend only on position differences, so attention is
        unchanged while positions stay inside the trained range). Rows padded by ``>= n``
        lose padding only."""
        keep = self.length - n
        rebased = (self.offset < n).nonzero().squeeze(1)
        cos, sin = rotary(torch.tensor([-n], device=self.offset.device), head_dim, rope_theta)
        for buffers in (self.layers, self.decoder):
            for k, v in buffers:
                k[:, :, :keep] = k[:, :, n:self.length].clone()
                v[:, :, :keep] = v[:, :, n:self.length].clone()
                if rebased.numel():
                    k[rebased, :, :keep] = apply_rotary(k[rebased, :, :keep], (cos, sin))
        self.offset = (self.offset - n).clamp(min=0)
        self.length = keep


class BlockForward:
    """The denoiser forward of one block's steps (`DiffusionLM.block_forward`), prepared once.

    What every step of a block shares is made when the block starts, not at every step: the
    RoPE tables, the padding mask in SDPA's layout, each layer's `FusedWeights` and its
    `KVSlot` with the cache views it writes and attends. A step is then the layers' inference
    path (`TransformerLayer.infer`) over the block and the LM head: no mask construction
    (None when no row is padded: the block sees the whole cached prefix and itself), no
    host sync, no slicing.
    """

    def __init__(self, model: DiffusionLM, cache: KVCache, positions: torch.Tensor,
                 mask: torch.Tensor | None, rows: torch.Tensor | None = None,
                 rope: RopeTables | None = None):
        cfg, plan = model.cfg, model.cfg.plan
        self.model, self.cache, self.positions, self.mask = model, cache, positions, mask
        if not plan.has_decoder:  # the one stack denoises against its own cache
            layers, buffers = list(model.layers), cache.layers
        else:
            layers = [model.decoder_layer(k) for k in range(cfg.num_decoder_layers)]
            if plan.own_decoder_kv:
                buffers = cache.decoder
            else:  # decoder layer k attends its matched encoder layer's cache
                buffers = [cache.layers[cfg.matched_encoder_layer(k)] for k in range(cfg.num_decoder_layers)]
        self.layers = [(layer, layer.fused_weights()) for layer in layers]
        self.slots = cache.slots(buffers, rows)
        self.rope = model.rope_tables(positions) if rope is None else rope
        self.sdpa_mask = None if mask is None else mask[:, None]
        self.head_t, self.eps_term = model.inference_head()

    def select(self, rows: torch.Tensor) -> BlockForward:
        """The same forward for batch ``rows`` only (their prefix is copied, nothing is written)."""
        out = type(self).__new__(type(self))
        out.__dict__.update(self.__dict__)
        out.positions, out.mask = self.positions[rows], None if self.mask is None else self.mask[rows]
        out.slots = [KVSlot(slot.k, slot.v, slot.start, rows) for slot in self.slots]
        out.rope = self.rope.rows(rows)
        out.sdpa_mask = None if self.mask is None else self.sdpa_mask[rows]
        return out

    def __call__(self, xt: torch.Tensor) -> torch.Tensor:
        """Logits ``[batch, S, vocab]`` of the noisy block ``xt [batch, S]``."""
        model, (b, s) = self.model, xt.shape
        h = F.embedding(xt.view(-1), model.embed.weight)
        for (layer, weights), slot in zip(self.layers, self.slots, strict=True):
            h = layer.infer(h, weights, self.rope, self.sdpa_mask, slot, b)
        return torch.mm(inference_rms(h, self.eps_term), self.head_t).view(b, s, -1)


class DiffusionLM(nn.Module):
    """E2D2 (last-hidden or shared-KV), BD3-LM, MDLM or AR: ``cfg.plan`` (`e2d2.variants`)."""

    def __init__(self, cfg: ModelConfig, seed: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(TransformerLayer(cfg) for _ in range(cfg.num_layers))
        if cfg.plan.own_decoder_kv:
            self.encoder_norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        if cfg.plan.has_decoder and not cfg.tie_decoder_to_encoder:
            self.decoder_layers = nn.ModuleList(TransformerLayer(cfg) for _ in range(cfg.num_decoder_layers))
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self._rope_table: tuple[torch.Tensor, torch.Tensor] | None = None
        self.reset_parameters(seed)

    # ------------------------------------------------------------------ init
    def reset_parameters(self, seed: int | None = None) -> None:
        """The weights of ``seed`` (``e2d2.init``: norms ones, Normal(0, init_std), output
        projections scaled by 1/sqrt(2 * depth)), the same as the megatron engine's shards of
        that seed under any layout. ``seed=None`` draws one from torch's global generator."""
        initialize_(self, self.cfg, seed_from_global_rng() if seed is None else seed)

    # ------------------------------------------------------------- helpers
    def decoder_layer(self, k: int) -> TransformerLayer:
        if self.cfg.tie_decoder_to_encoder:
            return self.layers[self.cfg.matched_encoder_layer(k)]
        return self.decoder_layers[k]

    @property
    def head_weight(self) -> torch.Tensor:
        """The LM head's ``[vocab, hidden]`` weight (the embedding when tied)."""
        return self.embed.weight if self.cfg.tie_word_embeddings else self.lm_head.weight

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head: ``[batch, len, hidden] -> [batch, len, vocab]``."""
        return F.linear(self.norm(h), self.head_weight)

    def inference_head(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The final norm and LM head in the inference path's form (`e2d2.layers.FusedWeights`):
        ``head_t [hidden, vocab]``, contiguous, with the norm's weight and `inference_rms`'s
        ``sqrt(hidden)`` folded in, and the norm's `rms_eps_term`. Made once and kept until
        either weight changes."""
        def build(norm, head):
            head_t = (head * (norm * self.cfg.hidden_size**0.5)).t().contiguous()
            return head_t, rms_eps_term(self.cfg.hidden_size, self.cfg.norm_eps, head_t)

        return self._inference_cached("_inference_head", (self.norm.weight, self.head_weight), build)

    def inference_encoder_norm(self) -> tuple[torch.Tensor, torch.Tensor]:
        """E2D2 last-hidden's encoder norm in the inference path's form: its weight times
        `inference_rms`'s ``sqrt(hidden)``, and its `rms_eps_term`; kept until the weight changes."""
        def build(weight):
            scale = weight * self.cfg.hidden_size**0.5
            return scale, rms_eps_term(self.cfg.hidden_size, self.cfg.norm_eps, scale)

        return self._inference_cached("_inference_encoder_norm", (self.encoder_norm.weight,), build)

    def _inference_cached(self, name: str, params: tuple[torch.Tensor, ...], build):
        """``build(*params)``, made once and kept (a plain attribute ``name``, not a parameter)
        until any of ``params`` changes (`weights_key`)."""
        key = weights_key(params)
        cached = self.__dict__.get(name)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, build(*params))
            self.__dict__[name] = cached
        return cached[1]

    def rope_tables(self, positions: torch.Tensor) -> RopeTables:
        """The inference path's RoPE (`e2d2.layers.RopeTables`) for ``positions`` (``[len]`` or
        ``[batch, len]``): a block's steps and its commit share one."""
        return RopeTables(self._rope(positions), self.embed.weight.dtype)

    def _rope(self, positions: torch.Tensor):
        """cos/sin ``[len, head_dim]`` for ``positions [len]`` (``[batch, 1, len, head_dim]``
        for per-row ``positions [batch, len]``), from a table grown on demand (sampling calls
        this once per denoising step, so the table is not rebuilt every time). Positions must
        be ``>= 0``."""
        table = self._rope_table
        need = int(positions.max()) + 1 if positions.numel() else 1
        if table is None or table[0].shape[0] < need or table[0].device != positions.device:
            size = max(need, 2 * (0 if table is None else table[0].shape[0]), self.cfg.seq_length)
            table = rotary(torch.arange(size, device=positions.device), self.cfg.kv_channels, self.cfg.rope_theta)
            self._rope_table = table
        if positions.dim() == 2:
            return table[0][positions].unsqueeze(1), table[1][positions].unsqueeze(1)
        return table[0][positions], table[1][positions]

    # ------------------------------------------------------------- training
    def forward(
        self,
        x0: torch.Tensor,
        xt: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        block_size: int | None = None,
        anneal: float = 1.0,
    ) -> torch.Tensor:
        """Logits for every position of the noisy stream (AR: of the next token).

        x0, xt: ``[batch, L]`` clean / noisy tokens; attention_mask (1 = real) and
        context_mask (1 = prompt): ``[batch, L]`` or None. ``block_size`` overrides the
        trained one (sampling with another block size). ``anneal``: the attention annealing
        ratio (`e2d2.masks.with_anneal`; 1 = the variant's mask). Returns ``[batch, L,
        vocab]``; with ``cfg.shift`` aligned with the targets (`e2d2.shift`).
        """
        cfg, plan, (batch, L), device = self.cfg, self.cfg.plan, x0.shape, x0.device
        S = block_size or cfg.diffusion_block_size
        pos = torch.arange(L, device=device)

        def mask_of(spec: AttentionMask):
            spec = for_model(spec, bidirectional_prompt=cfg.prompt_is_bidirectional,
                                   shift=cfg.shift, anneal=anneal)
            return build_mask(spec, L, S, device, batch, context_mask, attention_mask)

        noisy = noisy_input(plan, x0, xt, S) if cfg.shift else xt  # None for AR
        main_rope = self._rope(plan.main_positions(pos))
        h, main_kv = run_layers(self.layers, self.embed(plan.main_tokens(x0, noisy)), main_rope,
                                mask_of(plan.main_mask), last_kv_only=plan.top_layer_kv_only)
        if plan.has_decoder:  # a one-stream encoder (every E2D2) has the decoder's positions
            rope = main_rope if len(plan.main_streams) == 1 else self._rope(pos)
            h = self._decode(h, main_kv, noisy, rope, mask_of(plan.decoder_mask))
        else:
            h = h[:, plan.predicted(L)]
        out = self.logits(h)
        return align_logits(out) if cfg.shift else out

    def _decode(self, h_enc, enc_kv, noisy, rope, mask) -> torch.Tensor:
        """The E2D2 decoder over the noisy stream ``[batch, L]``, reading the clean keys its
        plan names: ``[batch, L, hidden]``."""
        cfg = self.cfg
        if cfg.plan.own_decoder_kv:
            h_enc = self.encoder_norm(h_enc)
        h = self.embed(noisy)
        for k in range(cfg.num_decoder_layers):
            layer = self.decoder_layer(k)
            if cfg.plan.own_decoder_kv:
                prefix = layer.kv(h_enc, rope)
            else:
                prefix = enc_kv[cfg.matched_encoder_layer(k)]
            h, _ = layer(h, rope, mask, prefix)
        return h

    # ------------------------------------------------------------- sampling
    def new_cache(self, batch: int, capacity: int, offset: torch.Tensor | None = None) -> KVCache:
        """An empty cache for ``batch`` rows of up to ``capacity`` columns (``offset``: each
        row's left padding, default 0)."""
        cfg, p = self.cfg, self.embed.weight
        shape = (batch, cfg.num_query_groups, capacity, cfg.kv_channels)

        def buffers(n: int) -> list[KV]:
            return [(p.new_zeros(shape), p.new_zeros(shape)) for _ in range(n)]

        n_dec = cfg.num_decoder_layers if cfg.plan.own_decoder_kv else 0
        if offset is None:
            offset = torch.zeros(batch, dtype=torch.long, device=p.device)
        return KVCache(buffers(cfg.num_layers), buffers(n_dec), offset)

    def encode(
        self, tokens: torch.Tensor, cache: KVCache, positions: torch.Tensor,
        mask: torch.Tensor | None = None, keep: int | None = None, rope: RopeTables | None = None,
    ) -> torch.Tensor | None:
        """Run the clean stack over ``tokens [batch, n]`` placed after the cache's columns, write
        their K/V there and keep the first ``keep`` (default all) of them: ``cache.length``
        grows by ``keep``; the rest stays unclaimed (a prompt tail is re-encoded with its block).

        ``positions [batch, n]``: each token's position (RoPE). ``mask``: ``bool[batch, n,
        length + n]`` over the cached columns then the new tokens, or None (all visible).
        E2D2 runs its encoder (and, last-hidden, the decoder layers' K/V of ``h_enc``); BD3-LM
        and AR their stack. Returns the stack's output ``[batch, n, hidden]`` (AR reads its
        logits from it), or None for shared-KV, whose top encoder layer only writes its K/V
        (`VariantPlan.top_layer_kv_only`). ``rope``: `rope_tables` of ``positions``, where the caller has them.
        Inference only: no autograd (the inference path of `e2d2.layers`).
        """
        cfg, n = self.cfg, tokens.shape[1]
        if cfg.plan.decoding == "whole_sequence":
            raise ValueError(f"{cfg.variant} has no block KV cache; sample it uncached")
        if cache.length + n > cache.capacity:
            raise ValueError(f"cache of {cache.capacity} columns cannot take {n} tokens after {cache.length}")
        rope = self.rope_tables(positions) if rope is None else rope
        sdpa_mask = None if mask is None else mask[:, None]
        h = F.embedding(tokens.reshape(-1), self.embed.weight)
        layers, slots = list(self.layers), cache.slots(cache.layers)
        if cfg.plan.top_layer_kv_only:  # the decoder reads the top layer's K/V, not its output
            top, top_slot = layers.pop(), slots.pop()
        for layer, slot in zip(layers, slots, strict=True):
            h = layer.infer(h, layer.fused_weights(), rope, sdpa_mask, slot, tokens.shape[0])
        h = h.view(*tokens.shape, -1)
        if cfg.plan.top_layer_kv_only:
            top_slot.extend(top.infer_kv(h, top.fused_weights(), rope))
            h = None
        if cfg.plan.own_decoder_kv:
            scale, eps_term = self.inference_encoder_norm()
            h_enc = inference_rms(h, eps_term) * scale
            end = cache.length + n
            for k, (dk, dv) in enumerate(cache.decoder):
                layer = self.decoder_layer(k)
                dk[:, :, cache.length:end], dv[:, :, cache.length:end] = layer.infer_kv(h_enc, layer.fused_weights(), rope)
        cache.length += n if keep is None else keep
        return h

    def block_forward(self, cache: KVCache, positions: torch.Tensor, mask: torch.Tensor | None = None,
                      rows: torch.Tensor | None = None, rope: RopeTables | None = None) -> BlockForward:
        """`denoise` prepared for all the steps of one block (the sampler makes one per block;
        ``rope``: `rope_tables` of ``positions``, where the caller has them)."""
        return BlockForward(self, cache, positions, mask, rows, rope)

    def denoise(
        self, xt: torch.Tensor, cache: KVCache, positions: torch.Tensor,
        mask: torch.Tensor | None = None, rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``[batch, S, vocab]`` for the noisy block ``xt [batch, S]`` that follows the cache.

        The block sees every cached clean column and itself (offset block-causal plus
        block-diagonal); ``mask [batch, S, length + S]`` hides columns a row must not see (its
        left padding). E2D2 runs only the decoder. ``rows``: the cache rows ``xt`` belongs to
        (None = all), so a step can run only the rows whose block changed. Inference only:
        no autograd (the inference path of `e2d2.layers`).
        """
        return self.block_forward(cache, positions, mask, rows)(xt)
