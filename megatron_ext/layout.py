"""Parallel layout: how a world of ranks is split, and which layers each pipeline stage holds.

Everything here is plain arithmetic on configs, so every invalid layout fails with
one ``ConfigError`` before any process group is created.

Placement (``PipelinePlan``) over ``N = P x V`` (virtual) stages (``V = virtual_pipeline``
chunks per rank for megatron's interleaved schedule, else 1; virtual stage ``v`` is chunk
``v // P`` of pipeline rank ``v % P``): for E2D2 stages ``0..k-1`` hold the encoder layers
and stages ``k..N-1`` the decoder layers, ``k = encoder_pipeline_stages``; single-stack
variants spread their layers over all stages.

How many layers each stage holds: by default the split that minimizes the predicted slowest
stage (max stage / mean stage), from ``e2d2.flops.layer_costs``: the forward FLOPs of a
(main-stack or encoder) layer, a decoder layer, the embedding and the LM head with its loss,
which sits on the last stage. Encoder and decoder stages are balanced as two groups (the
boundary stays between stages k-1 and k; encoder stages may hold different numbers of
layers); every stage holds at least one layer; among equally good splits earlier stages
take more. ``ParallelConfig.pipeline_layers`` overrides it with explicit counts. Placement
only decides which reference layers a stage holds: parameters are mapped and checkpointed
by reference name (``megatron_ext.mapping``), so they load under any placement.

Where E2D2 embeds the noisy stream ``xt``: without interleaving, on the first decoder
stage, so the word embedding has copies on stage 0, stage ``k`` and (tied head) the last
stage, kept in sync by megatron over a custom embedding group. With interleaving, megatron's
``finalize_model_grads`` only looks for embedding copies in a rank's first or last chunk, so
stage 0 embeds ``xt`` too and the encoder stages carry it untouched in the decoder half of
the inter-stage tensor; the copies are then megatron's usual first and last stage.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass

from e2d2 import flops
from e2d2.config import PRECISIONS, ModelConfig
from e2d2.errors import ConfigError

# megatron-core's TransformerConfig.fp8_recipe values ("custom" needs a quantizer factory: not offered).
FP8_RECIPES: tuple[str, ...] = ("delayed", "tensorwise", "mxfp8", "blockwise")
# megatron-core's TransformerConfig.fp8 values (the FP8 format).
FP8_FORMATS: tuple[str, ...] = ("hybrid", "e4m3")
# megatron-core's TransformerConfig.transformer_impl values this model supports.
TRANSFORMER_IMPLS: tuple[str, ...] = ("local", "transformer_engine")
# Activation recomputation: none, core attention only (megatron's "selective" default), or
# every Transformer layer (megatron's "full" with the uniform method, one layer per checkpoint).
RECOMPUTE: tuple[str, ...] = ("none", "selective", "full")


def transformer_engine_available() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


@dataclass(frozen=True)
class ParallelConfig:
    """How ``world_size`` ranks are split: ``world = TP x PP x CP x DP`` (DP derived).

    ``encoder_pipeline_stages`` (k) only applies to E2D2 with ``pipeline_parallel > 1`` and
    counts virtual stages (``1..P x V - 1``);
    ``precision`` (``e2d2.train.PRECISIONS``): ``"fp32"``; ``"bf16"``: bf16 parameters and
    activations through megatron's ``Float16Module``, fp32 gradient buffers and fp32 main
    parameters in megatron's mixed-precision (or distributed) optimizer; ``"fp8"``: bf16 plus
    Transformer Engine FP8 linears with ``fp8_recipe`` (``FP8_RECIPES``) and ``fp8_format``
    (``FP8_FORMATS``, megatron's ``TransformerConfig.fp8``).
    ``transformer_impl`` picks the attention/MLP linears: megatron-core's ``"local"`` ones or
    Transformer Engine's (``"transformer_engine"``, needs TE importable); unset, it is
    ``"transformer_engine"`` for ``precision="fp8"`` and ``"local"`` otherwise, and after
    construction it always holds the resolved name.
    ``pipeline_layers``: layers per (virtual) stage in pipeline order, overriding the
    FLOPs-balanced default (E2D2: the ``k`` encoder stages' counts, then the decoder stages');
    checked against the model in ``PipelinePlan``.
    ``overlap_grad_reduce`` / ``overlap_param_gather``: megatron DDP's bucketed gradient
    reduction during the backward pass / parameter all-gather during the next forward (the
    latter needs the distributed optimizer). ``recompute`` (``RECOMPUTE``): activation
    recomputation in the backward pass. ``context_parallel`` (C): each sequence split over C
    ranks of megatron's context-parallel group (``megatron_ext.context``).
    """

    world_size: int
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    encoder_pipeline_stages: int | None = None
    virtual_pipeline: int | None = None
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    transformer_impl: str | None = None
    fp8_recipe: str = "delayed"
    fp8_format: str = "hybrid"
    pipeline_layers: tuple[int, ...] | None = None
    precision: str = "fp32"
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    recompute: str = "none"
    context_parallel: int = 1

    def __post_init__(self) -> None:
        for name in ("world_size", "tensor_parallel", "pipeline_parallel", "context_parallel"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        model_parallel = self.tensor_parallel * self.pipeline_parallel * self.context_parallel
        if self.world_size % model_parallel:
            raise ConfigError(
                f"world size {self.world_size} is not divisible by tensor_parallel x "
                f"pipeline_parallel x context_parallel = {self.tensor_parallel} x "
                f"{self.pipeline_parallel} x {self.context_parallel}; "
                "use a world size that is a multiple of their product"
            )
        if self.virtual_pipeline is not None and (
            self.virtual_pipeline < 2 or self.pipeline_parallel < 2
        ):
            raise ConfigError(
                f"virtual_pipeline={self.virtual_pipeline} needs pipeline_parallel > 1 and at "
                "least 2 chunks per stage; leave it unset otherwise"
            )
        stages = self.num_stages
        if self.encoder_pipeline_stages is not None and not (
            1 <= self.encoder_pipeline_stages <= stages - 1
        ):
            raise ConfigError(
                f"encoder_pipeline_stages={self.encoder_pipeline_stages} must be in "
                f"1..{stages - 1} ({stages} pipeline stages: the encoder and the decoder each "
                "need at least one), or auto for the FLOPs-balanced split"
            )
        if self.pipeline_layers is not None:
            object.__setattr__(self, "pipeline_layers", tuple(self.pipeline_layers))
            if self.pipeline_parallel < 2:
                raise ConfigError("pipeline_layers only applies with pipeline_parallel > 1; "
                                  "unset it")
            if len(self.pipeline_layers) != stages or min(self.pipeline_layers) < 1:
                raise ConfigError(
                    f"pipeline_layers={list(self.pipeline_layers)} must give {stages} counts "
                    f"(one per (virtual) pipeline stage), each >= 1"
                )
        if self.sequence_parallel and self.tensor_parallel == 1:
            raise ConfigError("sequence_parallel needs tensor_parallel > 1")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r}; choose one of {PRECISIONS}")
        if self.recompute not in RECOMPUTE:
            raise ConfigError(f"unknown recompute {self.recompute!r}; choose one of {RECOMPUTE}")
        if self.overlap_param_gather and not self.use_distributed_optimizer:
            raise ConfigError("overlap_param_gather needs use_distributed_optimizer=true (the "
                              "parameters are all-gathered only from its shards); set both, "
                              "or unset overlap_param_gather")
        if self.transformer_impl is None:
            object.__setattr__(self, "transformer_impl",
                               "transformer_engine" if self.precision == "fp8" else "local")
        if self.transformer_impl not in TRANSFORMER_IMPLS:
            raise ConfigError(f"unknown transformer_impl {self.transformer_impl!r}; "
                              f"choose one of {TRANSFORMER_IMPLS}")
        if self.fp8_recipe not in FP8_RECIPES:
            raise ConfigError(f"unknown fp8 recipe {self.fp8_recipe!r}; choose one of {FP8_RECIPES}")
        if self.fp8_format not in FP8_FORMATS:
            raise ConfigError(f"unknown fp8_format {self.fp8_format!r}; "
                              f"choose one of {FP8_FORMATS}")
        if self.precision == "fp8":
            if self.transformer_impl == "local":
                raise ConfigError(
                    "precision='fp8' with transformer_impl='local': megatron-core's local "
                    "layers have no FP8 path; use transformer_impl='transformer_engine' (or "
                    "leave it unset) or precision='bf16'"
                )
            if not transformer_engine_available():
                raise ConfigError(
                    f"precision='fp8' (recipe {self.fp8_recipe!r}) needs Transformer Engine, "
                    "which is not importable here; install transformer-engine[pytorch] on a "
                    "GPU machine or use precision='bf16' (this never falls back to bf16 silently)"
                )
        elif self.transformer_impl == "transformer_engine" and not transformer_engine_available():
            raise ConfigError(
                "transformer_impl='transformer_engine' needs Transformer Engine, which is not "
                "importable here; install transformer-engine[pytorch] on a GPU machine or use "
                "transformer_impl='local'"
            )

    @property
    def fp8(self) -> str | None:
        """The FP8 recipe when ``precision="fp8"``, else None."""
        return self.fp8_recipe if self.precision == "fp8" else None

    @property
    def bf16(self) -> bool:
        """bf16 parameters and activations (``precision`` bf16, or fp8 outside the FP8 GEMMs)."""
        return self.precision != "fp32"

    def describe_precision(self) -> str:
        """One line for the start-up report: the precision of each part of the step."""
        if not self.bf16:
            text = "fp32 (weights, activations, gradients, optimizer)"
        else:
            text = ("bf16 weights and activations, fp32 gradient buffers, main weights, Adam "
                    "moments and loss")
            if self.fp8:
                text = f"fp8 linears (recipe {self.fp8}, format {self.fp8_format}), otherwise {text}"
        overlap = [name for name, on in (("grad reduce", self.overlap_grad_reduce),
                                         ("param gather", self.overlap_param_gather)) if on]
        return (f"{text}; recompute {self.recompute}; overlapped "
                f"{' and '.join(overlap) if overlap else 'nothing'}")

    @property
    def num_stages(self) -> int:
        """Virtual pipeline stages: ``pipeline_parallel x virtual_pipeline``."""
        return self.pipeline_parallel * (self.virtual_pipeline or 1)

    @property
    def data_parallel(self) -> int:
        return self.world_size // (self.tensor_parallel * self.pipeline_parallel
                                   * self.context_parallel)

    @property
    def name(self) -> str:
        parts = [f"tp{self.tensor_parallel}", f"pp{self.pipeline_parallel}", f"dp{self.data_parallel}"]
        if self.context_parallel > 1:
            parts.append(f"cp{self.context_parallel}")
        if self.encoder_pipeline_stages is not None:
            parts.append(f"enc{self.encoder_pipeline_stages}")
        if self.virtual_pipeline is not None:
            parts.append(f"vp{self.virtual_pipeline}")
        if self.pipeline_layers is not None:
            parts.append("layers" + "x".join(map(str, self.pipeline_layers)))
        if self.sequence_parallel:
            parts.append("sp")
        if self.use_distributed_optimizer:
            parts.append("distopt")
        if self.transformer_impl == "transformer_engine":
            parts.append("te")
        if self.fp8 is not None:
            parts.append(f"fp8-{self.fp8}-{self.fp8_format}")
        elif self.bf16:
            parts.append("bf16")
        if self.overlap_grad_reduce:
            parts.append("overlapgrad")
        if self.overlap_param_gather:
            parts.append("overlapparam")
        if self.recompute != "none":
            parts.append(f"recompute{self.recompute}")
        return "-".join(parts)


@dataclass(frozen=True)
class StageLayers:
    """Layers one pipeline stage holds, as half-open ranges of reference-model layer indices."""

    encoder: range
    decoder: range
    holds_embedding: bool  # input embedding of either stream (first stage, first decoder stage)
    holds_head: bool  # final norm(s) and LM head (last stage)
    embeds_noisy: bool  # E2D2: this stage embeds xt (see the module docstring)


def _ranges(counts: list[int]) -> list[range]:
    starts = [sum(counts[:i]) for i in range(len(counts))]
    return [range(start, start + n) for start, n in zip(starts, counts, strict=True)]


def _balanced_counts(num_layers: int, layer_cost: float, fixed: list[float]) -> list[int]:
    """Layers per stage (each >= 1) minimizing ``max(fixed[s] + count[s] * layer_cost)``;
    among optima, earlier stages take more. ``fixed``: what each stage holds besides its
    layers (the LM head on the last stage). A dynamic program over suffixes: tiny sizes."""
    m = len(fixed)
    # best[s][n]: least possible slowest stage when stages s.. hold the last n layers.
    best = [[float("inf")] * (num_layers + 1) for _ in range(m + 1)]
    best[m][0] = 0.0
    for s in range(m - 1, -1, -1):
        for n in range(m - s, num_layers + 1):
            best[s][n] = min(max(fixed[s] + c * layer_cost, best[s + 1][n - c])
                             for c in range(1, n - (m - s - 1) + 1))
    counts, left = [], num_layers
    for s in range(m):
        target = best[s][left]
        count = max(c for c in range(1, left - (m - s - 1) + 1)
                    if max(fixed[s] + c * layer_cost, best[s + 1][left - c]) <= target * (1 + 1e-12))
        counts.append(count)
        left -= count
    return counts


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
        cp = par.context_parallel
        if cp > 1:
            _check_context_parallel(model, cp)
        if par.sequence_parallel and (model.seq_length // cp) % tp:
            positions = (f"seq_length={model.seq_length}" if cp == 1 else "the positions per "
                         f"context-parallel rank, seq_length / context_parallel = "
                         f"{model.seq_length // cp}")
            raise ConfigError(f"sequence_parallel splits positions over TP ranks: "
                              f"tensor_parallel={tp} must divide {positions}")
        n = self.num_stages
        if model.is_e2d2 and pp > 1:
            if model.plan.decoder_keys == "encoder_kv":
                raise ConfigError(
                    f"{model.variant} reads each matched encoder layer's K/V inside the decoder, "
                    "so its layers must sit on one stage: use pipeline_parallel=1"
                )
            if par.encoder_pipeline_stages is None:
                k, imbalance = balanced_encoder_stages(model, par)
                raise ConfigError(
                    f"E2D2 with {n} pipeline stages needs encoder_pipeline_stages in 1..{n - 1} "
                    f"or auto; {k} balances the stages best (predicted max/mean {imbalance:.2f})"
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
        if par.pipeline_layers is not None:
            groups = self._groups()
            given = list(par.pipeline_layers)
            for name, stages, want in groups:
                got = sum(given[stages.start:stages.stop])
                if got != want:
                    where = "" if len(groups) == 1 else f" (stages {stages.start}..{stages.stop - 1})"
                    raise ConfigError(
                        f"pipeline_layers={given} puts {got} layers on the {name} stages{where} "
                        f"but the model has {want}; make them sum to {want}"
                    )

    @property
    def num_stages(self) -> int:
        return self.parallel.num_stages

    def _groups(self) -> list[tuple[str, range, int]]:
        """(name, stages, layers) of each group of stages balanced on its own: E2D2's encoder
        and decoder stages, or every stage of a single stack."""
        model, n = self.model, self.num_stages
        if model.is_e2d2 and n > 1:
            k = self.parallel.encoder_pipeline_stages
            return [("encoder", range(k), model.num_layers),
                    ("decoder", range(k, n), model.num_decoder_layers)]
        return [("main", range(n), model.num_layers)]

    def _noisy_embedder(self) -> int:
        """The stage that embeds E2D2's ``xt`` (see the module docstring)."""
        if self.model.is_e2d2 and self.num_stages > 1 and not self.parallel.virtual_pipeline:
            return self.parallel.encoder_pipeline_stages
        return 0

    def layer_counts(self) -> list[int]:
        """Layers per (virtual) stage: ``pipeline_layers`` if given, else FLOPs-balanced."""
        if self.parallel.pipeline_layers is not None:
            return list(self.parallel.pipeline_layers)
        if self.num_stages == 1:
            return [self.model.num_layers]
        costs, n = flops.layer_costs(self.model), self.num_stages
        embedders = (0, self._noisy_embedder())
        counts = []
        for name, stages, layers in self._groups():
            per_layer = costs.decoder_layer if name == "decoder" else costs.layer
            fixed = [(costs.embedding.masked if s in embedders else 0.0)
                     + (costs.head.masked if s == n - 1 else 0.0) for s in stages]
            counts += _balanced_counts(layers, per_layer.masked, fixed)
        return counts

    def stages(self) -> list[StageLayers]:
        """Layers of every (virtual) stage, in pipeline order."""
        model, pp = self.model, self.num_stages
        counts = self.layer_counts()
        if model.is_e2d2 and pp > 1:
            k = self.parallel.encoder_pipeline_stages
            empty_enc = range(model.num_layers, model.num_layers)
            enc = _ranges(counts[:k]) + [empty_enc] * (pp - k)
            dec = [range(0, 0)] * k + _ranges(counts[k:])
        else:
            enc = _ranges(counts)
            full_dec = range(model.num_decoder_layers)
            dec = [full_dec if stage == pp - 1 else range(0, 0) for stage in range(pp)]
        noisy_embedder = self._noisy_embedder()
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

    def stage_flops(self) -> list[float]:
        """Predicted forward FLOPs of one training sequence on each (virtual) stage
        (``e2d2.flops.layer_costs``, attention counted over the visible pairs)."""
        costs = flops.layer_costs(self.model)
        out = []
        for layers in self.stages():
            total = len(layers.encoder) * costs.layer + len(layers.decoder) * costs.decoder_layer
            if self.model.num_layers - 1 in layers.encoder:
                total += costs.top_layer - costs.layer
            if layers.holds_embedding:
                total += costs.embedding
            if layers.holds_head:
                total += costs.head
            out.append(total.masked)
        return out

    def imbalance(self) -> float:
        """Predicted slowest stage over the mean stage (1.0 is perfectly balanced)."""
        per_stage = self.stage_flops()
        return max(per_stage) * len(per_stage) / sum(per_stage)

    def describe_shares(self) -> str:
        """``"stage 0 47.1%, stage 1 52.9% (max/mean 1.06)"``: each stage's predicted share of
        the forward FLOPs, for the run's start-up log; followed by the ``encoder_pipeline_stages``
        that would balance E2D2's stages clearly better on the same pipeline, if one would."""
        per_stage = self.stage_flops()
        shares = ", ".join(f"stage {s} {100 * f / sum(per_stage):.1f}%"
                           for s, f in enumerate(per_stage))
        text = f"{shares} (max/mean {self.imbalance():.2f})"
        par = self.parallel
        if self.model.is_e2d2 and self.num_stages > 1 and par.pipeline_layers is None:
            k, imbalance = balanced_encoder_stages(self.model, par)
            if imbalance < self.imbalance() / BETTER_BALANCE:
                text += (f"; parallel.encoder_pipeline_stages={k} predicts max/mean "
                         f"{imbalance:.2f} on the same pipeline")
        return text

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


def _check_context_parallel(model: ModelConfig, cp: int) -> None:
    """Each stream splits into ``2 cp`` chunks of whole blocks (``megatron_ext.context``)."""
    unit = 2 * cp * model.block_size
    if model.seq_length % unit:
        valid = ", ".join(str(unit * n) for n in range(1, 4))
        raise ConfigError(
            f"context_parallel={cp} splits each sequence into {2 * cp} chunks of whole blocks "
            f"(block_size={model.block_size}): seq_length={model.seq_length} must be a multiple "
            f"of {unit} ({valid}, ...)")


# How much lower another encoder/decoder split's predicted imbalance must be for the start-up
# log to suggest it: the FLOPs model is not exact enough to chase smaller gains.
BETTER_BALANCE = 1.05


def balanced_encoder_stages(model: ModelConfig, parallel: ParallelConfig) -> tuple[int, float]:
    """``(k, max/mean)``: the ``encoder_pipeline_stages`` whose FLOPs-balanced placement has
    the lowest predicted imbalance for E2D2 on ``parallel``'s (virtual) pipeline stages, among
    those that give every stage a layer (``pipeline_layers`` ignored)."""
    n = parallel.num_stages
    feasible = [k for k in range(1, n) if k <= model.num_layers and n - k <= model.num_decoder_layers]
    if not feasible:
        raise ConfigError(
            f"more pipeline stages than layers: {n} stages for num_layers={model.num_layers} "
            f"+ num_decoder_layers={model.num_decoder_layers}; every stage needs at least one layer")
    plans = {k: PipelinePlan(model, dataclasses.replace(parallel, encoder_pipeline_stages=k,
                                                        pipeline_layers=None))
             for k in feasible}
    k = min(plans, key=lambda k: plans[k].imbalance())
    return k, plans[k].imbalance()
