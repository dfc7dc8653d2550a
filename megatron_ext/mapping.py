"""Name mapping between a parallel stage and the reference model, and lossless conversion.

A stage parameter's reference name is its own name with

* ``layers.{i}`` shifted by the stage's first encoder/main-stack layer,
* ``decoder_layers.{k}`` shifted by the stage's first decoder layer,
* ``attn.q_layernorm``/``attn.k_layernorm`` renamed ``attn.q_norm``/``attn.k_norm``.

Its tensor-parallel split follows the megatron layer that owns it: column-parallel
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
from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.fp8_utils import is_column_parallel_linear, is_row_parallel_linear
from megatron.core.tensor_parallel import VocabParallelEmbedding

from e2d2 import init
from e2d2.config import ModelConfig
from e2d2.model import DiffusionLM

_RENAMES = {"attn.q_layernorm.": "attn.q_norm.", "attn.k_layernorm.": "attn.k_norm."}


@dataclass(frozen=True)
class ParamMap:
    """One stage parameter: its reference name and the dim it is split on over TP (or None)."""

    local_name: str
    reference_name: str
    param: torch.nn.Parameter
    tp_axis: int | None


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


def param_maps(stage: torch.nn.Module) -> list[ParamMap]:
    """Every parameter of a ``ParallelDiffusionLM`` stage, in ``named_parameters`` order."""
    modules = dict(stage.named_modules())
    here = stage.layers_here
    maps = []
    for local_name, param in stage.named_parameters():
        owner = modules[local_name.rpartition(".")[0]]
        ref = _reference_name(local_name, here.encoder.start, here.decoder.start)
        maps.append(ParamMap(local_name, ref, param, _tp_axis(owner)))
    return maps


def _shard(full: torch.Tensor, axis: int | None) -> torch.Tensor:
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
        if m.reference_name not in reference_state:
            raise KeyError(f"reference state has no {m.reference_name!r} (for {m.local_name})")
        shard = _shard(reference_state[m.reference_name], m.tp_axis)
        if shard.shape != m.param.shape:
            raise ValueError(f"{m.reference_name}: shard {tuple(shard.shape)} does not fit "
                             f"{m.local_name} {tuple(m.param.shape)}")
        with torch.no_grad():
            m.param.copy_(shard)


def _gather_tp(tensor: torch.Tensor, axis: int | None) -> torch.Tensor:
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if axis is None or tp == 1:
        return tensor.detach().clone()
    parts = [torch.empty_like(tensor) for _ in range(tp)]
    torch.distributed.all_gather(parts, tensor.detach().contiguous(),
                                 group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=axis)


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
            local[m.reference_name] = _gather_tp(tensor, m.tp_axis)
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
    """The reference slices ``m.param`` holds on this TP rank: the whole tensor, or this rank's
    ``1/TP`` block along ``m.tp_axis`` (what ``_shard`` cuts)."""
    full, source = list(m.param.shape), ()
    if m.tp_axis is not None:
        rank = parallel_state.get_tensor_model_parallel_rank()
        size = full[m.tp_axis]
        full[m.tp_axis] *= parallel_state.get_tensor_model_parallel_world_size()
        source = (slice(None),) * m.tp_axis + (slice(rank * size, (rank + 1) * size),)
    return [ShardPiece(m.reference_name, tuple(full), source)]


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
