"""Parallel layout: how a world of ranks is split, and which layers each pipeline stage holds.

Everything here is plain arithmetic on configs, so every invalid layout fails with
one ``ConfigError`` before any process group is created.

Placement (``PipelinePlan``) over ``N = P x V`` (virtual) stages (``V = virtual_pipeline``
chunks per rank for megatron's interleaved schedule, else 1; virtual stage ``v`` is chunk
``v // P`` of pipeline rank ``v % P``): for E2D2 stages ``0..k-1`` hold the encoder layers
and stages ``k..N-1`` the decoder layers, ``k = encoder_pipeline_stages``; single-stack
variants spread their layers over all stages. Layers are split as evenly as possible,
earlier stages taking the remainder.

Where E2D2 embeds the noisy stream ``xt``: without interleaving, on the first decoder
stage, so the word embedding has copies on stage 0, stage ``k`` and (tied head) the last
stage, kept in sync by megatron over a custom embedding group. With interleaving, megatron's
``finalize_model_grads`` only looks for embedding copies in a rank's first or last chunk, so
stage 0 embeds ``xt`` too and the encoder stages carry it untouched in the decoder half of
the inter-stage tensor; the copies are then megatron's usual first and last stage.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from e2d2.config import ModelConfig
from e2d2.errors import ConfigError

# megatron-core's TransformerConfig.fp8_recipe values ("custom" needs a quantizer factory: not offered).
FP8_RECIPES: tuple[str, ...] = ("delayed", "tensorwise", "mxfp8", "blockwise")
# megatron-core's TransformerConfig.fp8 values (the FP8 format).
FP8_FORMATS: tuple[str, ...] = ("hybrid", "e4m3")
# megatron-core's TransformerConfig.transformer_impl values this model supports.
TRANSFORMER_IMPLS: tuple[str, ...] = ("local", "transformer_engine")


def transformer_engine_available() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


@dataclass(frozen=True)
class ParallelConfig:
    """How ``world_size`` ranks are split: ``world = TP x PP x DP`` (DP derived).

    ``encoder_pipeline_stages`` (k) only applies to E2D2 with ``pipeline_parallel > 1`` and
    counts virtual stages (``1..P x V - 1``);
    ``transformer_impl`` picks the attention/MLP linears: megatron-core's ``"local"`` ones or
    Transformer Engine's (``"transformer_engine"``, needs TE importable); unset, it is
    ``"transformer_engine"`` when ``fp8`` is set and ``"local"`` otherwise, and after
    construction it always holds the resolved name.
    ``fp8`` names a megatron-core FP8 recipe (``FP8_RECIPES``) and ``fp8_format`` the FP8
    format (megatron's ``TransformerConfig.fp8``); FP8 needs the Transformer Engine layers.
    """

    world_size: int
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    encoder_pipeline_stages: int | None = None
    virtual_pipeline: int | None = None
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    transformer_impl: str | None = None
    fp8: str | None = None
    fp8_format: str = "hybrid"

    def __post_init__(self) -> None:
        for name in ("world_size", "tensor_parallel", "pipeline_parallel"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        model_parallel = self.tensor_parallel * self.pipeline_parallel
        if self.world_size % model_parallel:
            raise ConfigError(
                f"world size {self.world_size} is not divisible by tensor_parallel x "
                f"pipeline_parallel = {self.tensor_parallel} x {self.pipeline_parallel}; "
                "use a world size that is a multiple of their product"
            )
        if self.virtual_pipeline is not None and (
            self.virtual_pipeline < 2 or self.pipeline_parallel < 2
        ):
            raise ConfigError(
                f"virtual_pipeline={self.virtual_pipeline} needs pipeline_parallel > 1 and at "
                "least 2 chunks per stage; leave it unset otherwise"
            )
        stages = self.pipeline_parallel * (self.virtual_pipeline or 1)
        if self.encoder_pipeline_stages is not None and not (
            1 <= self.encoder_pipeline_stages <= stages - 1
        ):
            raise ConfigError(
                f"encoder_pipeline_stages={self.encoder_pipeline_stages} must be in "
                f"1..{stages - 1} ({stages} pipeline stages): "
                "the encoder and the decoder each need at least one stage"
            )
        if self.sequence_parallel and self.tensor_parallel == 1:
            raise ConfigError("sequence_parallel needs tensor_parallel > 1")
        if self.transformer_impl is None:
            object.__setattr__(self, "transformer_impl",
                               "local" if self.fp8 is None else "transformer_engine")
        if self.transformer_impl not in TRANSFORMER_IMPLS:
            raise ConfigError(f"unknown transformer_impl {self.transformer_impl!r}; "
                              f"choose one of {TRANSFORMER_IMPLS}")
        if self.fp8 is not None:
            if self.fp8 not in FP8_RECIPES:
                raise ConfigError(f"unknown fp8 recipe {self.fp8!r}; choose one of {FP8_RECIPES}")
            if self.fp8_format not in FP8_FORMATS:
                raise ConfigError(f"unknown fp8_format {self.fp8_format!r}; "
                                  f"choose one of {FP8_FORMATS}")
            if self.transformer_impl == "local":
                raise ConfigError(
                    f"fp8={self.fp8!r} with transformer_impl='local': megatron-core's local "
                    "layers have no FP8 path; use transformer_impl='transformer_engine' (or "
                    "leave it unset) or set fp8=None"
                )
            if not transformer_engine_available():
                raise ConfigError(
                    f"fp8={self.fp8!r} needs Transformer Engine, which is not importable here; "
                    "install transformer-engine[pytorch] on a GPU machine or set fp8=None "
                    "(this never falls back to bf16 silently)"
                )
        elif self.transformer_impl == "transformer_engine" and not transformer_engine_available():
            raise ConfigError(
                "transformer_impl='transformer_engine' needs Transformer Engine, which is not "
                "importable here; install transformer-engine[pytorch] on a GPU machine or use "
                "transformer_impl='local'"
            )

    @property
    def data_parallel(self) -> int:
        return self.world_size // (self.tensor_parallel * self.pipeline_parallel)

    @property
    def name(self) -> str:
        parts = [f"tp{self.tensor_parallel}", f"pp{self.pipeline_parallel}", f"dp{self.data_parallel}"]
        if self.encoder_pipeline_stages is not None:
            parts.append(f"enc{self.encoder_pipeline_stages}")
        if self.virtual_pipeline is not None:
            parts.append(f"vp{self.virtual_pipeline}")
        if self.sequence_parallel:
            parts.append("sp")
        if self.use_distributed_optimizer:
            parts.append("distopt")
        if self.transformer_impl == "transformer_engine":
            parts.append("te")
        if self.fp8 is not None:
            parts.append(f"fp8-{self.fp8}-{self.fp8_format}")
        return "-".join(parts)


@dataclass(frozen=True)
class StageLayers:
    """Layers one pipeline stage holds, as half-open ranges of reference-model layer indices."""

    encoder: range
    decoder: range
    holds_embedding: bool  # input embedding of either stream (first stage, first decoder stage)
    holds_head: bool  # final norm(s) and LM head (last stage)
    embeds_noisy: bool  # E2D2: this stage embeds xt (see the module docstring)


def _split(num_layers: int, num_stages: int) -> list[range]:
    base, extra = divmod(num_layers, num_stages)
    ranges, start = [], 0
    for stage in range(num_stages):
        stop = start + base + (1 if stage < extra else 0)
        ranges.append(range(start, stop))
        start = stop
    return ranges


@dataclass(frozen=True)
class PipelinePlan:
    """Per-stage layer placement for one model on one layout; validated at construction."""

    model: ModelConfig
    parallel: ParallelConfig

    def __post_init__(self) -> None:
        model, par = self.model, self.parallel
        tp, pp = par.tensor_parallel, par.pipeline_parallel
        if model.num_attention_heads % tp:
            raise ConfigError(
                f"tensor_parallel={tp} does not divide num_attention_heads="
                f"{model.num_attention_heads}"
            )
        if model.num_query_groups % tp:
            raise ConfigError(
                f"tensor_parallel={tp} does not divide num_query_groups={model.num_query_groups} "
                "(KV heads); every tensor-parallel rank needs whole KV heads"
            )
        if model.vocab_size % tp:
            raise ConfigError(
                f"tensor_parallel={tp} does not divide vocab_size={model.vocab_size}; the "
                "vocab-parallel embedding needs equal slices (pad the vocabulary)"
            )
        if par.sequence_parallel and model.seq_length % tp:
            raise ConfigError(
                f"sequence_parallel splits positions over TP ranks: tensor_parallel={tp} must "
                f"divide seq_length={model.seq_length}"
            )
        n = self.num_stages
        if model.is_e2d2 and pp > 1:
            if model.variant == "e2d2_shared_kv":
                raise ConfigError(
                    "e2d2_shared_kv reads each matched encoder layer's K/V inside the decoder, so "
                    "its layers must sit on one stage: use pipeline_parallel=1"
                )
            if par.encoder_pipeline_stages is None:
                raise ConfigError(
                    f"E2D2 with {n} pipeline stages needs encoder_pipeline_stages in 1..{n - 1}"
                )
            k = par.encoder_pipeline_stages
            if model.num_layers < k or model.num_decoder_layers < n - k:
                raise ConfigError(
                    f"more pipeline stages than layers: {k} encoder stages for num_layers="
                    f"{model.num_layers} and {n - k} decoder stages for num_decoder_layers="
                    f"{model.num_decoder_layers}; every stage needs at least one layer"
                )
        else:
            if par.encoder_pipeline_stages is not None:
                raise ConfigError(
                    "encoder_pipeline_stages only applies to E2D2 (e2d2 variant) with "
                    f"pipeline_parallel > 1; unset it for variant {model.variant!r}"
                )
            if model.num_layers < n:
                raise ConfigError(
                    f"more pipeline stages than layers: {n} (virtual) pipeline "
                    f"stages for num_layers={model.num_layers}"
                )

    @property
    def num_stages(self) -> int:
        """Virtual pipeline stages: ``pipeline_parallel x virtual_pipeline``."""
        return self.parallel.pipeline_parallel * (self.parallel.virtual_pipeline or 1)

    def stages(self) -> list[StageLayers]:
        """Layers of every (virtual) stage, in pipeline order."""
        model, pp = self.model, self.num_stages
        if model.is_e2d2 and pp > 1:
            k = self.parallel.encoder_pipeline_stages
            enc = _split(model.num_layers, k) + [range(model.num_layers, model.num_layers)] * (pp - k)
            dec = [range(0, 0)] * k + _split(model.num_decoder_layers, pp - k)
            noisy_embedder = 0 if self.parallel.virtual_pipeline else k
        else:
            enc = _split(model.num_layers, pp)
            full_dec = range(model.num_decoder_layers)
            dec = [full_dec if stage == pp - 1 else range(0, 0) for stage in range(pp)]
            noisy_embedder = 0  # single-stack, or E2D2 on one stage
        return [
            StageLayers(
                encoder=enc[s],
                decoder=dec[s],
                holds_embedding=s in (0, noisy_embedder),
                holds_head=s == pp - 1,
                embeds_noisy=model.is_e2d2 and s == noisy_embedder,
            )
            for s in range(pp)
        ]

    def embedding_stages(self) -> list[int]:
        """Stages with a copy of the word embedding; their gradients are all-reduced.

        With tied embeddings the last stage's LM head is the same weight.
        """
        stages = [s for s, layers in enumerate(self.stages()) if layers.holds_embedding]
        if self.model.tie_word_embeddings:
            stages.append(self.num_stages - 1)
        return sorted(set(stages))

    def get_embedding_ranks(self, pp_ranks: list[int]) -> list[int]:
        """megatron ``initialize_model_parallel(get_embedding_ranks=...)`` callback."""
        holders = {s % self.parallel.pipeline_parallel for s in self.embedding_stages()}
        return [pp_ranks[p] for p in sorted(holders)]
