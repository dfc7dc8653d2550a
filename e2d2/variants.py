"""Each variant's stream plan: the one place a variant is defined (spec section 3).

A plan says which token streams the main stack reads and under which mask, whether an E2D2
decoder follows and where its clean keys come from, and how the variant is noised and
sampled. The reference model (`e2d2.model`), the engine's pipeline stages
(`megatron_ext.model`), the pipeline placement (`megatron_ext.layout`), the objective and
the FLOPs count (`e2d2.flops`) read the plan instead of the variant's name, so adding a
variant is one entry in ``PLANS`` (and, if it needs one, a mask rule in `e2d2.masks`).

Streams are length-``L`` token sequences: ``"clean"`` is ``x0``, ``"noisy"`` the noisy
stream (``xt``, or its shifted form under `e2d2.shift`). A stack over several streams
reads them concatenated along the sequence, each at positions ``0..L-1``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from e2d2.masks import AR, BD3LM, E2D2_DECODER, E2D2_ENCODER, MDLM, AttentionMask

if TYPE_CHECKING:  # the run configs read the plans without torch
    import torch

Stream = Literal["clean", "noisy"]
# Where each E2D2 decoder layer's clean keys come from: its own K/V projection of the
# normed last encoder hidden state ``h_enc`` (E2D2 last-hidden), or the K/V of its matched
# encoder layer (shared-KV).
DecoderKeys = Literal["h_enc", "encoder_kv"]
# How the variant is noised and sampled: block diffusion with a block KV cache, one
# diffusion block over the whole sequence without cache (MDLM), or next-token (AR).
Decoding = Literal["blocks", "whole_sequence", "autoregressive"]


@dataclass(frozen=True)
class VariantPlan:
    """How one variant runs its streams.

    ``main_streams`` / ``main_mask``: what the main stack (the E2D2 encoder, or a baseline's
    only stack) reads, and its attention mask. ``decoder_keys`` / ``decoder_mask``: the E2D2
    decoder over the noisy stream (None: single stack; its last stream is predicted).
    """

    main_streams: tuple[Stream, ...]
    main_mask: AttentionMask
    decoding: Decoding = "blocks"
    decoder_keys: DecoderKeys | None = None
    decoder_mask: AttentionMask | None = None

    def __post_init__(self) -> None:
        if (self.decoder_keys is None) != (self.decoder_mask is None):
            raise ValueError("a decoder needs both decoder_keys and decoder_mask")
        if self.main_mask.query_streams != len(self.main_streams):
            raise ValueError(f"mask {self.main_mask.name!r} spans {self.main_mask.query_streams} "
                             f"streams, the main stack reads {len(self.main_streams)}")

    @property
    def has_decoder(self) -> bool:
        return self.decoder_keys is not None

    @property
    def own_decoder_kv(self) -> bool:
        """Whether decoder layers project their own K/V of ``h_enc`` (and the encoder ends
        with the norm that makes ``h_enc``): parameters, cache buffers and FLOPs of their own."""
        return self.decoder_keys == "h_enc"

    @property
    def top_layer_kv_only(self) -> bool:
        """Whether only the K/V of the main stack's top layer are read (shared-KV: the decoder
        reads its matched encoder layers' K/V and never the encoder's output), so that layer
        projects its K/V and skips its queries, attention, output projection and MLP."""
        return self.decoder_keys == "encoder_kv"

    @property
    def num_streams(self) -> int:
        """Length-``L`` streams the model runs: the main stack's, plus the decoder's noisy one."""
        return len(self.main_streams) + self.has_decoder

    @property
    def autoregressive(self) -> bool:
        return self.decoding == "autoregressive"

    def main_tokens(self, x0: torch.Tensor, noisy: torch.Tensor | None) -> torch.Tensor:
        """The main stack's tokens ``[batch, len(main_streams) * L]``."""
        import torch

        streams = [x0 if s == "clean" else noisy for s in self.main_streams]
        return streams[0] if len(streams) == 1 else torch.cat(streams, 1)

    def main_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """Positions ``[len(main_streams) * L]`` of the main stack's tokens (each stream restarts)."""
        return positions.repeat(len(self.main_streams))

    def predicted(self, L: int) -> slice:
        """The main stack's outputs that are predictions, without a decoder: its last stream."""
        return slice((len(self.main_streams) - 1) * L, None)


PLANS: dict[str, VariantPlan] = {
    # encoder over x0 (block-causal), decoder over the noisy stream reading h_enc's K/V
    "e2d2": VariantPlan(("clean",), E2D2_ENCODER, decoder_keys="h_enc",
                        decoder_mask=E2D2_DECODER),
    # the decoder reads the K/V its matched encoder layer already computed
    "e2d2_shared_kv": VariantPlan(("clean",), E2D2_ENCODER, decoder_keys="encoder_kv",
                                  decoder_mask=E2D2_DECODER),
    # one stack over [x0 ; xt] (spec 3.3)
    "bd3lm": VariantPlan(("clean", "noisy"), BD3LM),
    "mdlm": VariantPlan(("noisy",), MDLM, decoding="whole_sequence"),
    "ar": VariantPlan(("clean",), AR, decoding="autoregressive"),
}
