"""Sharded checkpoints with megatron-core's dist_checkpointing, keyed by reference names.

Every model tensor is saved under ``model.{reference name}`` with its tensor-parallel slice
as the shard, so a checkpoint written under one TP/PP layout loads under any other, and a
single process can read full reference tensors (``read_model_state``). A fused parameter
(``megatron_ext.mapping.FUSIONS``: ``linear_qkv``, ``linear_fc1``) is saved as its
reference tensors, through a ``ShardedTensorFactory`` that splits it on save and joins it
on load (as megatron's ``apply_swiglu_sharded_factory`` does for its SwiGLU ``linear_fc1``;
the optimizer states of the parameter go through the same factory). The files are
therefore the same as before the projections were fused: older checkpoints load as they are. Replicas
(data-parallel copies, norms repeated over TP ranks, word-embedding copies on several
pipeline stages) get distinct ``replica_id``s with exactly one main copy, which
dist_checkpointing writes once.

A training checkpoint (``save_training_state``) adds, in the same directory:

* ``ema.{reference name}``: the EMA of the weights, sharded like the weights;
* ``optimizer``: megatron's optimizer state. The distributed optimizer uses megatron's
  ``fully_reshardable`` format, so its state reshards across TP, PP and DP like the model;
* ``rng``: every rank's RNG states (python, numpy, torch, CUDA, megatron's model-parallel
  tracker) as one sharded object per rank; restored only on the same layout;
* common state (``common``): anything picklable the caller passes, written once by rank 0.
"""

from __future__ import annotations

import functools
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor
from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

from e2d2.errors import UserError
from megatron_ext import optimizer_fixes
from megatron_ext.mapping import ParamMap, Part, param_maps

MODEL_PREFIX = "model."
EMA_PREFIX = "ema."
# megatron's DistributedOptimizer format that reshards over TP, PP and DP.
OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "fully_reshardable"}


class CheckpointError(UserError):
    """A checkpoint that cannot be read."""


class ModelMismatchError(CheckpointError):
    """A readable checkpoint of another model (a tensor missing or of another shape)."""


def sharded_state_dict(chunks: list[torch.nn.Module], prefix: str = MODEL_PREFIX,
                       tensors: list[torch.Tensor] | None = None
                       ) -> dict[str, ShardedTensor | ShardedTensorFactory]:
    """This rank's parameters (all model chunks) keyed ``prefix + ParamMap.name``: a
    ShardedTensor, or for a fused parameter a factory of one per reference tensor.

    ``tensors`` (one per parameter, in ``param_maps`` order over the chunks) are saved in the
    parameters' places instead: the EMA weights.
    """
    out = {}
    params = [m for stage in chunks for m in _stage_maps(stage)]
    if tensors is not None and len(tensors) != len(params):
        raise ValueError(f"{len(tensors)} tensors for {len(params)} parameters")
    for index, (m, replica_id) in enumerate(params):
        data = m.param if tensors is None else tensors[index]
        key = prefix + m.name
        if m.fused:
            # merge: the fused tensor from the loaded shards
            out[key] = ShardedTensorFactory(key, data, functools.partial(_build_parts, m), m.join,
                                            replica_id)
        else:
            out[key] = _part_tensor(key, m.parts[0], data, replica_id)
    return out


def _part_tensor(key: str, part: Part, shard: torch.Tensor, replica_id) -> ShardedTensor:
    if part.tp_axis is None:
        return ShardedTensor.from_rank_offsets(key, shard, replica_id=replica_id)
    return ShardedTensor.from_rank_offsets(
        key, shard, (part.tp_axis, parallel_state.get_tensor_model_parallel_rank(),
                     parallel_state.get_tensor_model_parallel_world_size()),
        replica_id=replica_id)


def _build_parts(m: ParamMap, key: str, data: torch.Tensor, replica_id, flattened_range):
    """Factory build: one ShardedTensor per reference tensor of the fused ``m``. ``key`` ends
    with ``m.name`` (``model.``, ``ema.`` or an optimizer state's prefix before it)."""
    assert flattened_range is None, "flattened optimizer states are not used (fully_reshardable)"
    stem = key.removesuffix(m.name)
    return [_part_tensor(stem + part.reference_name, part, part.read(data), replica_id)
            for part in m.parts]


def _stage_maps(stage: torch.nn.Module):
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    dp_rank = parallel_state.get_data_parallel_rank()
    embedding_stages = stage.plan.embedding_stages()
    for m in param_maps(stage):
        # Only the word embedding lives on several stages; the first holder is the main copy.
        pp_copy = embedding_stages.index(stage.stage) if m.name == "embed.weight" else 0
        yield m, ((pp_copy, tp_rank, dp_rank) if m.tp_axis is None else (pp_copy, 0, dp_rank))


def _prepare(directory: str | Path) -> None:
    path = Path(directory)
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"checkpoint directory {directory} is not empty; use a new one")
    torch.distributed.barrier()  # every rank has checked before any rank writes
    path.mkdir(parents=True, exist_ok=True)


def save(chunks: list[torch.nn.Module], directory: str) -> None:
    """Collective over all ranks: write this layout's weights to an empty ``directory``.

    Raises FileExistsError on a non-empty directory: dist_checkpointing would mix the new
    shards with the old metadata.
    """
    _prepare(directory)
    dist_checkpointing.save(sharded_state_dict(chunks), str(directory))


def load(chunks: list[torch.nn.Module], directory: str, prefix: str = MODEL_PREFIX) -> None:
    """Collective over all ranks: fill this rank's model chunks from a checkpoint of any layout
    (``prefix``: its model weights, or ``EMA_PREFIX`` for its EMA)."""
    _check_shapes(chunks, directory)
    if prefix != MODEL_PREFIX and not any(
            k.startswith(prefix) for k in dist_checkpointing.load_tensors_metadata(str(directory))):
        raise CheckpointError(f"{directory} has no {prefix}* tensors: the run kept no EMA")
    loaded = dist_checkpointing.load(sharded_state_dict(chunks, prefix), str(directory))
    _copy_into_params(chunks, loaded, prefix)


def _copy_into_params(chunks, loaded: dict, prefix: str) -> None:
    with torch.no_grad():
        for stage in chunks:
            for m in param_maps(stage):
                m.param.copy_(loaded[prefix + m.name])


def _check_shapes(chunks: list[torch.nn.Module], directory: str | Path) -> None:
    """One clear error when the checkpoint holds another model (a missing or resized tensor)."""
    try:
        saved = dist_checkpointing.load_tensors_metadata(str(directory))
    except Exception as exc:  # noqa: BLE001 - any unreadable metadata is the same user error
        raise CheckpointError(f"{directory} is not a readable checkpoint: {exc}") from None
    tp = parallel_state.get_tensor_model_parallel_world_size()
    for stage in chunks:
        for m in param_maps(stage):
            for part in m.parts:
                _check_shape(directory, saved, MODEL_PREFIX + part.reference_name,
                             part.shape(m.param.shape), part.tp_axis, tp)


def _check_shape(directory, saved: dict, key: str, shard: tuple[int, ...], tp_axis: int | None,
                 tp: int) -> None:
    full = list(shard)
    if tp_axis is not None:
        full[tp_axis] *= tp
    if key not in saved:
        raise ModelMismatchError(f"checkpoint {directory} has no tensor {key!r}: it holds "
                                 "another model (variant or depth changed?)")
    if tuple(saved[key].global_shape) != tuple(full):
        raise ModelMismatchError(
            f"checkpoint {directory}: {key} has shape {tuple(saved[key].global_shape)}, "
            f"this model needs {tuple(full)}; the model config changed since it was saved")


def rng_state() -> dict[str, Any]:
    """Every RNG state of this process."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _rng_object(state: dict[str, Any] | None) -> ShardedObject:
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    return ShardedObject("rng", state, (world,), (rank,), replica_id=0)


def _training_state_dict(chunks, optimizer, ema, common, rng, is_loading: bool) -> dict:
    model = sharded_state_dict(chunks)
    state = dict(model)
    if ema is not None:
        state.update(sharded_state_dict(chunks, EMA_PREFIX, ema))
    if optimizer is not None and is_loading:
        optimizer_fixes.prepare_for_load(optimizer)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(model, is_loading=is_loading,
                                                          metadata=OPTIMIZER_FORMAT)
    if rng is not None:
        state["rng"] = _rng_object(rng)
    if common is not None:
        state["common"] = common
    return state


def save_training_state(directory: str | Path, chunks: list[torch.nn.Module], optimizer,
                        ema: list[torch.Tensor] | None, common: dict[str, Any]) -> None:
    """Collective: weights, EMA, optimizer, every rank's RNG and ``common`` to an empty
    ``directory``. Atomicity is the caller's: write to a temporary name, then rename."""
    _prepare(directory)
    state = _training_state_dict(chunks, optimizer, ema, common, rng_state(), is_loading=False)
    dist_checkpointing.save(state, str(directory))


def load_training_state(directory: str | Path, chunks: list[torch.nn.Module], optimizer,
                        ema: list[torch.Tensor] | None, restore_rng: bool) -> dict[str, Any]:
    """Collective: the inverse of ``save_training_state`` on any layout; returns ``common``.

    ``restore_rng`` only on the layout the checkpoint was saved with (one RNG state per rank).
    An EMA missing from the checkpoint starts from the loaded weights.
    """
    _check_shapes(chunks, directory)
    saved = dist_checkpointing.load_tensors_metadata(str(directory))
    has_ema = any(key.startswith(EMA_PREFIX) for key in saved)
    template = _training_state_dict(chunks, optimizer, ema if has_ema else None, None,
                                    {} if restore_rng else None, is_loading=True)
    loaded = dist_checkpointing.load(template, str(directory))
    _copy_into_params(chunks, loaded, MODEL_PREFIX)
    if ema is not None:
        with torch.no_grad():
            source = (loaded[EMA_PREFIX + m.name] if has_ema else m.param
                      for stage in chunks for m in param_maps(stage))
            for tensor, value in zip(ema, source, strict=True):
                tensor.copy_(value)
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
        optimizer_fixes.after_load(optimizer)
    if restore_rng:
        set_rng_state(loaded["rng"])
    return loaded["common"]


def read_common(directory: str | Path) -> dict[str, Any]:
    """The ``common`` state of a training checkpoint, on one process, without the tensors."""
    try:
        return dist_checkpointing.load_common_state_dict(str(directory))["common"]
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{directory} is not a readable training checkpoint: {exc}") from None


def read_model_state(directory: str | Path, prefix: str = MODEL_PREFIX,
                     names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Full reference tensors ``{name: tensor}`` (``prefix`` stripped) from a checkpoint of any
    layout, on one process (a gloo world of one, or rank 0 of any world with ``names`` split
    into calls to bound memory). Nothing is unpickled but the checkpoint's own metadata."""
    try:
        saved = dist_checkpointing.load_tensors_metadata(str(directory))
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{directory} is not a readable checkpoint: {exc}") from None
    keys = [k for k in saved if k.startswith(prefix)]
    if names is not None:
        keys = [prefix + n for n in names]
    if not keys:
        raise CheckpointError(f"checkpoint {directory} holds no {prefix}* tensors")
    template = {k: ShardedTensor.from_rank_offsets(
        k, torch.empty(saved[k].global_shape, dtype=saved[k].dtype), replica_id=0) for k in keys}
    loaded = dist_checkpointing.load(template, str(directory))  # also returns the common state
    return {k[len(prefix):]: loaded[k] for k in keys}
