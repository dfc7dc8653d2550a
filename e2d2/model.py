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
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from e2d2 import masks
from e2d2.attention import build_mask
from e2d2.config import ModelConfig
from e2d2.layers import KV, TransformerLayer, rotary, run_layers


@dataclass
class KVCache:
    """Clean-stream keys/values for block-by-block sampling.

    ``layers[i]``: main-stack layer ``i``'s K/V over the clean tokens seen so far.
    ``decoder[k]``: E2D2 last-hidden only, decoder layer ``k``'s K/V of ``h_enc``.
    Each entry is ``([batch, groups, length, head_dim], same)``.
    """

    layers: list[KV | None]
    decoder: list[KV | None] = field(default_factory=list)
    length: int = 0

    def select(self, rows: torch.Tensor) -> KVCache:
        """Keep only batch ``rows`` (used when some sequences stop early)."""

        def pick(kv: KV | None) -> KV | None:
            return None if kv is None else (kv[0].index_select(0, rows), kv[1].index_select(0, rows))

        return KVCache([pick(kv) for kv in self.layers], [pick(kv) for kv in self.decoder], self.length)


def _append(kv: KV | None, new: KV) -> KV:
    return new if kv is None else (torch.cat((kv[0], new[0]), 2), torch.cat((kv[1], new[1]), 2))


class DiffusionLM(nn.Module):
    """E2D2 (last-hidden or shared-KV), BD3-LM, MDLM or AR, chosen by ``cfg.variant``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(TransformerLayer(cfg) for _ in range(cfg.num_layers))
        if cfg.variant == "e2d2":
            self.encoder_norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        if cfg.is_e2d2 and not cfg.tie_decoder_to_encoder:
            self.decoder_layers = nn.ModuleList(TransformerLayer(cfg) for _ in range(cfg.num_decoder_layers))
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self._rope_table: tuple[torch.Tensor, torch.Tensor] | None = None
        self.reset_parameters()

    # ------------------------------------------------------------------ init
    def reset_parameters(self) -> None:
        """Normal(0, init_std); output projections scaled by 1/sqrt(2 * depth) (GPT-2 / Megatron)."""
        cfg = self.cfg
        out_std = cfg.init_std / math.sqrt(2.0 * (cfg.num_layers + cfg.num_decoder_layers))
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=out_std)
            else:
                nn.init.normal_(p, std=cfg.init_std)

    # ------------------------------------------------------------- helpers
    def decoder_layer(self, k: int) -> TransformerLayer:
        if self.cfg.tie_decoder_to_encoder:
            return self.layers[self.cfg.matched_encoder_layer(k)]
        return self.decoder_layers[k]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head: ``[batch, len, hidden] -> [batch, len, vocab]``."""
        h = self.norm(h)
        weight = self.embed.weight if self.cfg.tie_word_embeddings else self.lm_head.weight
        return F.linear(h, weight)

    def _rope(self, positions: torch.Tensor):
        """cos/sin ``[len, head_dim]`` for ``positions``, from a table grown on demand (sampling
        calls this once per denoising step, so the table is not rebuilt every time)."""
        table = self._rope_table
        need = int(positions.max()) + 1
        if table is None or table[0].shape[0] < need or table[0].device != positions.device:
            size = max(need, 2 * (0 if table is None else table[0].shape[0]), self.cfg.seq_length)
            table = rotary(torch.arange(size, device=positions.device), self.cfg.kv_channels, self.cfg.rope_theta)
            self._rope_table = table
        return table[0][positions], table[1][positions]

    # ------------------------------------------------------------- training
    def forward(
        self,
        x0: torch.Tensor,
        xt: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits for every position of the noisy stream (AR: of the next token).

        x0, xt: ``[batch, L]`` clean / noisy tokens; attention_mask (1 = real) and
        context_mask (1 = prompt): ``[batch, L]`` or None. Returns ``[batch, L, vocab]``.
        """
        cfg, (batch, L), device = self.cfg, x0.shape, x0.device
        S = cfg.diffusion_block_size
        pos = torch.arange(L, device=device)
        rope = self._rope(pos)

        def mask_of(spec: masks.AttentionMask):
            spec = masks.with_prompt_rule(spec, cfg.prompt_is_bidirectional)
            return build_mask(spec, L, S, device, batch, context_mask, attention_mask)

        if cfg.variant == "ar":
            h, _ = run_layers(self.layers, self.embed(x0), rope, mask_of(masks.AR))
            return self.logits(h)
        if cfg.variant == "mdlm":
            h, _ = run_layers(self.layers, self.embed(xt), rope, mask_of(masks.MDLM))
            return self.logits(h)
        if cfg.variant == "bd3lm":
            both = self.embed(torch.cat((x0, xt), 1))
            h, _ = run_layers(self.layers, both, self._rope(torch.cat((pos, pos))), mask_of(masks.BD3LM))
            return self.logits(h[:, L:])

        # E2D2: encoder over the clean stream, then the decoder over the noisy stream.
        h_enc, enc_kv = run_layers(self.layers, self.embed(x0), rope, mask_of(masks.E2D2_ENCODER))
        if cfg.variant == "e2d2":
            h_enc = self.encoder_norm(h_enc)
        dec_mask = mask_of(masks.E2D2_DECODER)
        h = self.embed(xt)
        for k in range(cfg.num_decoder_layers):
            layer = self.decoder_layer(k)
            if cfg.variant == "e2d2":
                prefix = layer.kv(h_enc, rope)
            else:
                prefix = enc_kv[cfg.matched_encoder_layer(k)]
            h, _ = layer(h, rope, dec_mask, prefix)
        return self.logits(h)

    # ------------------------------------------------------------- sampling
    def new_cache(self) -> KVCache:
        n_dec = self.cfg.num_decoder_layers if self.cfg.variant == "e2d2" else 0
        return KVCache([None] * self.cfg.num_layers, [None] * n_dec)

    def encode(self, tokens: torch.Tensor, cache: KVCache) -> None:
        """Append clean ``tokens [batch, n]`` (whole blocks) to the cache, block-causally.

        E2D2 runs only its encoder here; BD3-LM runs its stack over the clean block.
        """
        cfg, n = self.cfg, tokens.shape[1]
        if cfg.variant in ("mdlm", "ar"):
            raise ValueError(f"variant {cfg.variant!r} has no block KV cache; sample it uncached")
        start, S = cache.length, cfg.block_size
        if start % S or n % S:
            raise ValueError(f"encode expects whole blocks: start={start}, n={n}, block_size={S}")
        rope = self._rope(torch.arange(start, start + n, device=tokens.device))
        # Within one block everything is visible; several blocks (a prompt) need block-causality.
        mask = None if n == S else masks.e2d2_encoder(start + n, S, device=tokens.device)[start:]
        h = self.embed(tokens)
        for i, layer in enumerate(self.layers):
            h, kv = layer(h, rope, mask, cache.layers[i])
            cache.layers[i] = _append(cache.layers[i], kv)
        if cfg.variant == "e2d2":
            h_enc = self.encoder_norm(h)
            for k in range(cfg.num_decoder_layers):
                cache.decoder[k] = _append(cache.decoder[k], self.decoder_layer(k).kv(h_enc, rope))
        cache.length = start + n

    def denoise(self, xt: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits ``[batch, S, vocab]`` for the noisy block ``xt [batch, S]`` that follows the cache.

        The block sees every cached clean token and itself (offset block-causal plus
        block-diagonal). E2D2 runs only the decoder.
        """
        cfg = self.cfg
        start = cache.length
        rope = self._rope(torch.arange(start, start + xt.shape[1], device=xt.device))
        h = self.embed(xt)
        if cfg.variant == "bd3lm":
            h, _ = run_layers(self.layers, h, rope, None, cache.layers)
            return self.logits(h)
        if cfg.variant == "e2d2":
            prefixes = cache.decoder
        else:
            prefixes = [cache.layers[cfg.matched_encoder_layer(k)] for k in range(cfg.num_decoder_layers)]
        decoder = [self.decoder_layer(k) for k in range(cfg.num_decoder_layers)]
        h, _ = run_layers(decoder, h, rope, None, prefixes)
        return self.logits(h)
