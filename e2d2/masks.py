"""Attention masks of every variant: the one place they are defined.

Each mask is one rule over (query index, key index), written with elementwise
tensor ops only, so the *same* function yields both

* a dense boolean tensor for SDPA (``AttentionMask.dense``), and
* a FlexAttention ``mask_mod`` (``AttentionMask.mask_mod``), which CUDA runs block-sparse.

``True`` means "may attend". Index conventions (``L`` = sequence length, ``S`` = block size,
block of position ``i`` is ``i // S``):

* E2D2 encoder: queries and keys are the clean stream ``[0, L)``.
* E2D2 decoder: queries are the noisy stream ``[0, L)``; keys are ``[clean ; noisy]``,
  indices ``[0, L)`` clean then ``[L, 2L)`` noisy.
* BD3-LM: queries and keys are ``[clean ; noisy]`` (length ``2L``).
* MDLM, AR: one stream ``[0, L)``.

Optional per-position tensors (``[L]`` or ``[batch, L]``, bool):

* ``context``: prompt tokens. Under a mask with ``bidirectional_context`` (the E2D2 encoder;
  BD3-LM only on request, see `with_prompt_rule`), a context query of the clean
  stream attends exactly the context keys of the clean stream, in every block, and nothing
  else: the prompt is read bidirectionally (seq2seq prompts) and never sees a target. A
  context query that also attended block-causally would leak whenever a prompt ends inside a
  block: it would read that block's clean targets, and every later query reading it would too.
  Non-context queries keep the variant's rule. Context never changes the noisy stream, nor
  the MDLM/AR masks; BD3-LM ignores it by default, like the authors' code (its clean part
  stays block-causal, spec 3.3).
* ``padding``: ``True`` = real token. No real query attends a pad key; a pad query may
  also attend its own position, so no softmax row is empty (empty rows give NaN in SDPA).

Two transforms adapt an autoregressive checkpoint (DiffuLLaMA, spec section 7):

* `with_shift`: the noisy stream's slot ``s`` predicts token ``s + 1`` (as the AR model
  did), so a noisy query or key at slot ``s`` counts as block ``(s + 1) // S``: a noisy
  query of shifted block ``b`` attends noisy slots ``[bS - 1, bS + S - 2]`` and clean keys
  ``j < bS - 1`` (slot ``bS - 1`` holds the clean token ``x0[bS - 1]``, `e2d2.shift`). The
  clean stream keeps its mask; MDLM's full mask has no blocks to shift.
* `with_anneal`: ``target AND (causal OR u(q_pos, k_pos) < r)`` for the annealing ratio
  ``r`` in ``[0, 1)`` (`anneal_ratio`), where causal means key position <= query position
  (each index's position within its stream) and ``u`` is a fixed integer hash of the
  position pair in ``[0, 1)``. At ``r = 0`` the mask is the target's causal part, at
  ``r = 1`` the target itself. The hash, not per-batch Bernoulli draws as in DiffuLLaMA's
  code, is deliberate: the mask is a function of the step alone, so it is the same on every
  rank and layout, after a resume, and in a FlexAttention ``mask_mod``; and it is monotone
  (an entry once visible stays visible). Applied after the prompt and padding rules, which
  it only narrows (a pad query's own key is causal, so no row becomes empty).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

# torch is imported where a mask is built, not here: the variants' plans, and with them the
# run configs, import this module, and the command line validates a config without torch.
if TYPE_CHECKING:
    import torch

    Rule = Callable[[torch.Tensor, torch.Tensor, int, int, int], torch.Tensor]  # (q, k, L, S, shift)
    MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# ``shift`` (0 or 1) is added to a position before its block is taken wherever the query is
# noisy (`with_shift`); clean queries and single-stream masks ignore it.
def _e2d2_encoder_rule(q: torch.Tensor, k: torch.Tensor, L: int, S: int, shift: int) -> torch.Tensor:
    return k // S <= q // S  # block-causal


def _e2d2_decoder_rule(q: torch.Tensor, k: torch.Tensor, L: int, S: int, shift: int) -> torch.Tensor:
    clean_key = k < L
    qb, kb = (q + shift) // S, (k % L + shift) // S
    # offset block-causal to the clean part, block-diagonal to the noisy part
    return (kb < qb).where(clean_key, kb == qb)


def _bd3lm_rule(q: torch.Tensor, k: torch.Tensor, L: int, S: int, shift: int) -> torch.Tensor:
    noisy_q, noisy_k = q >= L, k >= L
    qb, kb = (q % L) // S, (k % L) // S
    sqb, skb = (q % L + shift) // S, (k % L + shift) // S  # blocks as a noisy query sees them
    clean_to_clean = ~noisy_q & ~noisy_k & (kb <= qb)
    noisy_to_clean = noisy_q & ~noisy_k & (skb < sqb)
    noisy_to_noisy = noisy_q & noisy_k & (skb == sqb)
    return clean_to_clean | noisy_to_clean | noisy_to_noisy  # clean never sees noisy


def _mdlm_rule(q: torch.Tensor, k: torch.Tensor, L: int, S: int, shift: int) -> torch.Tensor:
    return (q >= 0) & (k >= 0)  # full bidirectional, shaped like the broadcast of q and k


def _ar_rule(q: torch.Tensor, k: torch.Tensor, L: int, S: int, shift: int) -> torch.Tensor:
    return k <= q


_U32 = 0xFFFFFFFF


def pair_hash(q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """A fixed hash of each (query position, key position) pair, uniform on ``[0, 2**32)``
    (int64, elementwise integer ops only, so it also runs inside a FlexAttention mask_mod):
    the pair is combined into 32 bits with two odd multipliers, then mixed by Wellons'
    ``lowbias32`` xorshift-multiply rounds. Products wrap modulo 2**64 and are cut to their
    low 32 bits, which is exact (the same on CPU, CUDA and in Triton)."""
    x = (q_pos.long() * 0x9E3779B1 + k_pos.long() * 0x85EBCA77 + 0x165667B1) & _U32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _U32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _U32
    return x ^ (x >> 16)


def anneal_ratio(step: int, anneal_steps: int) -> float:
    """The annealing ratio at training step ``step``: ``min(1, step / anneal_steps)``, 1 when
    ``anneal_steps`` is 0 (no annealing)."""
    return 1.0 if anneal_steps <= 0 else min(1.0, step / anneal_steps)


@dataclass(frozen=True)
class AttentionMask:
    """One mask definition, usable as a dense tensor and as a FlexAttention mask_mod.

    ``query_streams``/``key_streams`` say how many length-``L`` streams the query and key
    axes hold; key stream 0 is always clean, query index 0 lies in ``query_stream0``
    (0 clean, 1 noisy). ``self_key_offset``
    maps query index ``q`` to the key index ``q + offset * L`` of its own position, which a pad
    query may always attend.
    """

    name: str
    rule: Rule
    query_streams: int
    key_streams: int
    query_stream0: int  # which stream query index 0 belongs to (0 clean, 1 noisy)
    self_key_offset: int
    bidirectional_context: bool
    shift: bool = False  # `with_shift`
    anneal: float = 1.0  # `with_anneal`: the ratio r; 1 = the mask itself

    def mask_mod(
        self,
        seq_len: int,
        block_size: int,
        context: torch.Tensor | None = None,
        padding: torch.Tensor | None = None,
        device: torch.device | str | None = None,
    ) -> MaskMod:
        """FlexAttention ``mask_mod(b, h, q_idx, kv_idx) -> bool``; context/padding are ``[B, L]``.
        ``device``: where the indices will live (the annealing threshold is a tensor there)."""
        import torch

        L, S = seq_len, block_size
        ctx = None if context is None or not self.bidirectional_context else _as_batch(context)
        pad = None if padding is None else _as_batch(padding)
        # u < r as integers: hash < r * 2**32 (monotone in r; every pair is visible at r = 1).
        # A captured tensor, not a Python int: a compiled FlexAttention would guard on an
        # int's value and recompile for every step's ratio.
        threshold = None if self.anneal >= 1 else torch.tensor(
            int(self.anneal * 2**32), dtype=torch.long, device=device)

        def mod(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
            allowed = self.rule(q, k, L, S, int(self.shift))
            q_pos, k_pos = q % L, k % L
            if ctx is not None:
                q_ctx = ((q // L + self.query_stream0) == 0) & ctx[b, q_pos]  # clean context query
                k_ctx = (k < L) & ctx[b, k_pos]  # clean context key
                allowed = k_ctx.where(q_ctx, allowed)
            if pad is not None:
                own_key = k == q + self.self_key_offset * L
                allowed = (allowed & pad[b, k_pos]) | (~pad[b, q_pos] & own_key)
            if threshold is not None:
                allowed = allowed & ((k_pos <= q_pos) | (pair_hash(q_pos, k_pos) < threshold))
            return allowed

        return mod

    def shape(self, seq_len: int) -> tuple[int, int]:
        return self.query_streams * seq_len, self.key_streams * seq_len

    def dense(
        self,
        seq_len: int,
        block_size: int,
        context: torch.Tensor | None = None,
        padding: torch.Tensor | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """``bool[Lq, Lk]``, or ``bool[B, Lq, Lk]`` when context/padding are given."""
        import torch

        lq, lk = self.shape(seq_len)
        batched = context is not None or padding is not None
        q = torch.arange(lq, device=device).view(1, lq, 1)
        k = torch.arange(lk, device=device).view(1, 1, lk)
        n_batch = _batch_size(context, padding)
        b = torch.arange(n_batch, device=device).view(n_batch, 1, 1)
        mod = self.mask_mod(seq_len, block_size, _to(context, device), _to(padding, device), device)
        out = mod(b, torch.zeros((), dtype=torch.long, device=device), q, k)
        out = out.expand(n_batch, lq, lk)
        return out if batched else out[0]

    def block_mask(
        self,
        seq_len: int,
        block_size: int,
        batch_size: int | None = None,
        context: torch.Tensor | None = None,
        padding: torch.Tensor | None = None,
        device: torch.device | str = "cuda",
    ):
        """A FlexAttention ``BlockMask`` (block-sparse: fully masked tiles are skipped)."""
        from torch.nn.attention.flex_attention import create_block_mask

        lq, lk = self.shape(seq_len)
        batched = context is not None or padding is not None
        mod = self.mask_mod(seq_len, block_size, _to(context, device), _to(padding, device), device)
        return create_block_mask(
            mod, B=batch_size if batched else None, H=None, Q_LEN=lq, KV_LEN=lk, device=device
        )


def _as_batch(x: torch.Tensor) -> torch.Tensor:
    return x.bool().view(1, -1) if x.dim() == 1 else x.bool()


def _batch_size(*xs: torch.Tensor | None) -> int:
    sizes = {1 if x.dim() == 1 else x.shape[0] for x in xs if x is not None}
    if len(sizes) > 1:
        raise ValueError(f"context and padding have different batch sizes: {sorted(sizes)}")
    return sizes.pop() if sizes else 1


def _to(x: torch.Tensor | None, device: torch.device | str | None) -> torch.Tensor | None:
    return x if x is None or device is None else x.to(device)


E2D2_ENCODER = AttentionMask("e2d2_encoder", _e2d2_encoder_rule, 1, 1, 0, 0, True)
E2D2_DECODER = AttentionMask("e2d2_decoder", _e2d2_decoder_rule, 1, 2, 1, 1, False)
BD3LM = AttentionMask("bd3lm", _bd3lm_rule, 2, 2, 0, 0, False)  # the authors' prompt handling
MDLM = AttentionMask("mdlm", _mdlm_rule, 1, 1, 1, 0, False)
AR = AttentionMask("ar", _ar_rule, 1, 1, 0, 0, False)


def with_prompt_rule(spec: AttentionMask, bidirectional: bool) -> AttentionMask:
    """A clean-stream mask (E2D2 encoder, BD3-LM) with the bidirectional prompt rule on or off
    (``ModelConfig.prompt_is_bidirectional``); every other mask is returned unchanged."""
    if spec.name not in (E2D2_ENCODER.name, BD3LM.name) or spec.bidirectional_context == bidirectional:
        return spec
    return dataclasses.replace(spec, bidirectional_context=bidirectional)


def with_shift(spec: AttentionMask, shift: bool) -> AttentionMask:
    """``spec`` with the noisy stream's blocks shifted by one position (``ModelConfig.shift``):
    changes the E2D2 decoder and BD3-LM's noisy queries; every other mask is its own."""
    if spec.name not in (E2D2_DECODER.name, BD3LM.name) or spec.shift == shift:
        return spec
    return dataclasses.replace(spec, shift=shift)


def with_anneal(spec: AttentionMask, ratio: float) -> AttentionMask:
    """``spec`` annealed from causal at ``ratio`` in ``[0, 1)`` (see the module docstring);
    ``ratio >= 1`` returns ``spec`` itself (so the cached static mask stays in use)."""
    if not 0.0 <= ratio:
        raise ValueError(f"anneal ratio must be >= 0, got {ratio}")
    return spec if ratio >= 1.0 else dataclasses.replace(spec, anneal=float(ratio))


def for_model(spec: AttentionMask, *, bidirectional_prompt: bool, shift: bool = False,
              anneal: float = 1.0) -> AttentionMask:
    """``spec`` as a model configuration uses it (both engines call this): the prompt rule
    (``ModelConfig.prompt_is_bidirectional``), the shift and the annealing ratio."""
    spec = with_shift(with_prompt_rule(spec, bidirectional_prompt), shift)
    return with_anneal(spec, anneal)


def e2d2_encoder(L: int, S: int, *, context=None, padding=None, device=None) -> torch.Tensor:
    """Block-causal mask of the E2D2 encoder: ``bool[L, L]`` (``[B, L, L]`` with context/padding)."""
    return E2D2_ENCODER.dense(L, S, context, padding, device)


def e2d2_decoder(L: int, S: int, *, context=None, padding=None, device=None) -> torch.Tensor:
    """E2D2 decoder mask ``bool[L, 2L]``: keys are clean (offset block-causal) then noisy
    (block-diagonal)."""
    return E2D2_DECODER.dense(L, S, context, padding, device)


def bd3lm(L: int, S: int, *, context=None, padding=None, device=None,
          bidirectional_context: bool = False) -> torch.Tensor:
    """BD3-LM mask over ``[x0 ; xt]``: ``bool[2L, 2L]`` (context ignored unless asked for)."""
    return with_prompt_rule(BD3LM, bidirectional_context).dense(L, S, context, padding, device)


def mdlm(L: int, *, padding=None, device=None) -> torch.Tensor:
    """MDLM: full bidirectional attention, ``bool[L, L]``."""
    return MDLM.dense(L, L, None, padding, device)


def ar(L: int, *, padding=None, device=None) -> torch.Tensor:
    """Causal mask, ``bool[L, L]``."""
    return AR.dense(L, 1, None, padding, device)
