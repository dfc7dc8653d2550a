"""Name mapping between a parallel stage and the reference model, and lossless conversion.

A stage parameter's layout-independent name (``ParamMap.name``) is its own name with

* ``layers.{i}`` shifted by the stage's first encoder/main-stack layer,
* ``decoder_layers.{k}`` shifted by the stage's first decoder layer,
* ``attn.q_layernorm``/``attn.k_layernorm`` renamed ``attn.q_norm``/``attn.k_norm``.

That is the reference name, except for the fused projections (``FUSIONS``): one stage
parameter, megatron's ``linear_qkv`` or ``linear_fc1``, holds this TP rank's shards of
several reference tensors (``ParamMap.parts``). Every part is a TP shard of its reference
tensor; the split follows the megatron layer that owns the parameter: column-parallel
linears (local or Transformer Engine) and the vocab-parallel embedding split dim 0,
row-parallel linears dim 1, norms are replicated. That is all the conversion needs, for
any TP/PP layout:

* ``load_reference_state(stage, ref_state)``: reference state dict -> this rank's shards;
* ``gather_reference_state(chunks)``: every rank's shards -> the full reference state dict
  (also used for gradients, ``gather_reference_state(chunks, grads=True)``). Every rank then
  holds the whole model: for tests and ``megatron_ext.verify`` on small models only (export
  and checkpoints read and write shards, see ``megatron_ext.checkpoint``).

Initialisation is layout-invariant and light: ``initialize_at_seed(stage, cfg, seed)`` draws
only this rank's shards with ``e2d2.init``'s rule (per-tensor, per-row-chunk seeds), which is
also the reference model's, so the full weights are ``DiffusionLM(cfg, seed=seed)``'s under
every layout. What it needs of a parameter is ``shard_pieces``: which slice of which full
reference tensor goes where in the local parameter.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from megatron.core import parallel_state
from megatron.core.fp8_utils import is_column_parallel_linear, is_row_parallel_linear
from megatron.core.tensor_parallel import VocabParallelEmbedding

from e2d2 import init
from e2d2.config import ModelConfig
from e2d2.model import DiffusionLM

_RENAMES = {"attn.q_layernorm.": "attn.q_norm.", "attn.k_layernorm.": "attn.k_norm."}


@dataclass(frozen=True)
class Fusion:
    """A column-parallel stage parameter that holds several reference tensors.

    The full fused tensor is ``groups`` groups along dim 0, each holding, in order, ``1 /
    groups`` of every reference tensor's rows; TP rank ``r`` holds groups ``[r * groups /
    TP, (r + 1) * groups / TP)``, so every part of a rank is that rank's TP shard (dim 0) of
    its reference tensor."""

    tensors: tuple[str, ...]  # reference leaf names, in order inside a group
    rows: Callable[[ModelConfig], tuple[int, ...]]  # each reference tensor's dim 0
    groups: Callable[[ModelConfig, int], int]  # groups of the full tensor, given TP


FUSIONS: dict[str, Fusion] = {
    # megatron's linear_qkv (TP-invariant): per query group its q heads, its k head, its v head.
    "attn.linear_qkv.weight": Fusion(
        ("attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight"),
        rows=lambda c: (c.num_attention_heads * c.kv_channels, c.num_query_groups * c.kv_channels,
                        c.num_query_groups * c.kv_channels),
        groups=lambda c, tp: c.num_query_groups),
    # megatron's SwiGLU linear_fc1: [gate shard; up shard] on every TP rank.
    "mlp.linear_fc1.weight": Fusion(
        ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
        rows=lambda c: (c.ffn_hidden_size, c.ffn_hidden_size),
        groups=lambda c, tp: tp),
}


@dataclass(frozen=True)
class Part:
    """This TP rank's shard of one reference tensor inside a stage parameter.

    The parameter's dim 0 is viewed as ``[groups, rows per group]``; the part is rows
    ``rows`` of every group (an unfused parameter is one part: one group, every row).
    ``tp_axis``: the dim its reference tensor is split on over TP (None: replicated)."""

    reference_name: str
    tp_axis: int | None
    groups: int = 1
    rows: slice = field(default_factory=lambda: slice(None))

    def view(self, local: torch.Tensor) -> torch.Tensor:
        """The part inside ``local`` (the parameter, its grad, or a same-shaped tensor) as a
        writable view ``[groups, rows, ...]``."""
        return local.unflatten(0, (self.groups, -1))[:, self.rows]

    def read(self, local: torch.Tensor) -> torch.Tensor:
        """The shard in its reference tensor's layout (a copy when the part is strided)."""
        return self.view(local).flatten(0, 1)

    def write(self, local: torch.Tensor, shard: torch.Tensor) -> None:
        """Copy this rank's ``shard`` of the reference tensor into the part of ``local``."""
        self.view(local).copy_(shard.unflatten(0, (self.groups, -1)))

    def shape(self, local_shape: torch.Size) -> tuple[int, ...]:
        """The shard's shape for a parameter of ``local_shape``."""
        rows = len(range(local_shape[0] // self.groups)[self.rows]) * self.groups
        return (rows, *local_shape[1:])


@dataclass(frozen=True)
class ParamMap:
    """One stage parameter: its layout-independent ``name`` (the reference name unless
    fused), the dim it is split on over TP (or None), and the reference tensors it holds."""

    local_name: str
    name: str
    param: torch.nn.Parameter
    tp_axis: int | None
    parts: tuple[Part, ...]

    @property
    def fused(self) -> bool:
        return len(self.parts) > 1

    def local_from(self, reference_state: dict[str, torch.Tensor]) -> torch.Tensor:
        """This rank's tensor for the parameter, cut from full reference tensors.

        Raises KeyError naming the first missing reference tensor, ValueError on a shape
        mismatch, so a wrong config fails before training."""
        shards = []
        for part in self.parts:
            if part.reference_name not in reference_state:
                raise KeyError(f"reference state has no {part.reference_name!r} "
                               f"(for {self.local_name})")
            shard = tp_shard(reference_state[part.reference_name], part.tp_axis)
            if tuple(shard.shape) != part.shape(self.param.shape):
                raise ValueError(f"{part.reference_name}: shard {tuple(shard.shape)} does not fit "
                                 f"{self.local_name} {tuple(self.param.shape)}")
            shards.append(shard)
        return self.join(shards)

    def join(self, shards: list[torch.Tensor]) -> torch.Tensor:
        """This rank's tensor for the parameter from this rank's shard of each part (in
        ``parts`` order); an unfused parameter's one shard is returned as it is."""
        if not self.fused:
            return shards[0]
        local = shards[0].new_empty(self.param.shape)
        for part, shard in zip(self.parts, shards, strict=True):
            part.write(local, shard)
        return local

    def reference_from(self, per_rank: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Full reference tensors from every TP rank's tensor for the parameter (rank order;
        one tensor for a replicated parameter)."""
        return {part.reference_name: per_rank[0].clone() if part.tp_axis is None else
                torch.cat([part.read(t) for t in per_rank], dim=part.tp_axis)
                for part in self.parts}


def _tp_axis(module: torch.nn.Module) -> int | None:
    # megatron's own predicates, which also recognise Transformer Engine's column/row-parallel
    # linears when TE is importable (same weight layout: [out / TP, in] and [out, in / TP]).
    if is_column_parallel_linear(module) or isinstance(module, VocabParallelEmbedding):
        return 0
    if is_row_parallel_linear(module):
        return 1
    return None


def _reference_name(local_name: str, encoder_offset: int, decoder_offset: int) -> str:
    def shift(match: re.Match) -> str:
        offset = decoder_offset if match.group(1) == "decoder_layers" else encoder_offset
        return f"{match.group(1)}.{int(match.group(2)) + offset}."

    name = re.sub(r"^(layers|decoder_layers)\.(\d+)\.", shift, local_name)
    for old, new in _RENAMES.items():
        name = name.replace(old, new)
    return name


def _parts(name: str, tp_axis: int | None, cfg: ModelConfig, tp: int) -> tuple[Part, ...]:
    suffix = next((k for k in FUSIONS if name.endswith("." + k)), None)
    if suffix is None:
        return (Part(name, tp_axis),)
    fusion, stem = FUSIONS[suffix], name[: -len(suffix)]
    groups = fusion.groups(cfg, tp)
    parts, start = [], 0
    for leaf, rows in zip(fusion.tensors, fusion.rows(cfg), strict=True):
        per_group = rows // groups
        parts.append(Part(stem + leaf, 0, groups // tp, slice(start, start + per_group)))
        start += per_group
    return tuple(parts)


def param_maps(stage: torch.nn.Module) -> list[ParamMap]:
    """Every parameter of a ``ParallelDiffusionLM`` stage, in ``named_parameters`` order."""
    modules = dict(stage.named_modules())
    here = stage.layers_here
    tp = stage.config.tensor_model_parallel_size
    maps = []
    for local_name, param in stage.named_parameters():
        axis = _tp_axis(modules[local_name.rpartition(".")[0]])
        name = _reference_name(local_name, here.encoder.start, here.decoder.start)
        maps.append(ParamMap(local_name, name, param, axis, _parts(name, axis, stage.cfg, tp)))
    return maps


def tp_shard(full: torch.Tensor, axis: int | None) -> torch.Tensor:
    """This TP rank's slice of a full reference tensor split on ``axis`` (None: all of it)."""
    if axis is None:
        return full
    tp, rank = (parallel_state.get_tensor_model_parallel_world_size(),
                parallel_state.get_tensor_model_parallel_rank())
    return full.chunk(tp, dim=axis)[rank]


def load_reference_state(stage: torch.nn.Module, reference_state: dict[str, torch.Tensor]) -> None:
    """Copy this rank's shard of every reference tensor into ``stage``.

    Raises KeyError naming the first missing reference parameter, ValueError on a shape
    mismatch, so a wrong config fails before training.
    """
    for m in param_maps(stage):
        local = m.local_from(reference_state)
        with torch.no_grad():
            m.param.copy_(local)


def _gather_tp(tensor: torch.Tensor, axis: int | None) -> list[torch.Tensor]:
    """Every TP rank's copy of ``tensor`` (just this one when replicated or TP = 1)."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if axis is None or tp == 1:
        return [tensor.detach()]
    parts = [torch.empty_like(tensor) for _ in range(tp)]
    torch.distributed.all_gather(parts, tensor.detach().contiguous(),
                                 group=parallel_state.get_tensor_model_parallel_group())
    return parts


def gather_reference_state(chunks: list[torch.nn.Module], grads: bool = False
                           ) -> dict[str, torch.Tensor]:
    """The full reference state dict (or gradients: DDP's ``main_grad``) from this rank's
    model chunks (unwrapped stages), on every rank.

    Collective over the tensor- and pipeline-parallel groups of this rank.
    """
    local = {}
    for stage in chunks:
        for m in param_maps(stage):
            tensor = m.param.main_grad if grads else m.param
            local.update(m.reference_from(_gather_tp(tensor, m.tp_axis)))
    per_stage: list[dict] = [None] * parallel_state.get_pipeline_model_parallel_world_size()
    torch.distributed.all_gather_object(per_stage, local,
                                        group=parallel_state.get_pipeline_model_parallel_group())
    full: dict[str, torch.Tensor] = {}
    for stage_state in per_stage:
        full.update(stage_state)  # embedding copies on several stages are identical
    return full


@dataclass(frozen=True)
class ShardPiece:
    """Part of a local parameter: ``param[target] = full[source]``, where ``full`` is reference
    tensor ``reference_name`` of shape ``full_shape``. ``source``/``target``: step-1 slices
    per dim (missing trailing dims: whole; ``target=()``: the whole parameter). A parameter
    that fuses several reference tensors has one piece per tensor."""

    reference_name: str
    full_shape: tuple[int, ...]
    source: tuple[slice, ...]
    target: tuple[slice, ...] = ()


def shard_pieces(m: ParamMap) -> list[ShardPiece]:
    """The reference slices ``m.param`` holds on this TP rank: for each of its ``parts``, the
    whole tensor or this rank's ``1/TP`` block along the part's ``tp_axis`` (what
    ``tp_shard`` cuts); a fused part is one piece per group of the parameter (its rows in a
    group are contiguous, the groups are not)."""
    tp, rank = (parallel_state.get_tensor_model_parallel_world_size(),
                parallel_state.get_tensor_model_parallel_rank())
    pieces = []
    for part in m.parts:
        shard = part.shape(m.param.shape)
        full, offset = list(shard), 0
        if part.tp_axis is not None:
            full[part.tp_axis] *= tp
            offset = rank * shard[part.tp_axis]
        if not m.fused:
            source = () if part.tp_axis is None else (
                (slice(None),) * part.tp_axis + (slice(offset, offset + shard[part.tp_axis]),))
            pieces.append(ShardPiece(part.reference_name, tuple(full), source))
            continue
        rows, stride = shard[0] // part.groups, m.param.shape[0] // part.groups
        for group in range(part.groups):
            start = group * stride + part.rows.start
            pieces.append(ShardPiece(part.reference_name, tuple(full),
                                     (slice(offset + group * rows, offset + (group + 1) * rows),),
                                     (slice(start, start + rows),)))
    return pieces


def initialize_at_seed(stage: torch.nn.Module, cfg: ModelConfig, seed: int) -> None:
    """This rank's shards of ``DiffusionLM(cfg, seed=seed)``'s weights, drawn in place into
    ``stage`` without materialising any full tensor (``e2d2.init.fill_``)."""
    for m in param_maps(stage):
        for piece in shard_pieces(m):
            init.fill_(m.param.data[piece.target], cfg, seed, piece.reference_name,
                       piece.full_shape, piece.source)


def reference_state_at_seed(cfg: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """The full initial weights of ``seed`` (the reference model's; what ``initialize_at_seed``
    shards under any layout). The whole model in memory: for the reference side of tests,
    verification and single-process benchmarks."""
    return DiffusionLM(cfg, seed=seed).state_dict()
