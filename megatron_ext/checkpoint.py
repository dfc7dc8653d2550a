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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor
from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

from e2d2.config import ModelConfig
from e2d2.errors import UserError
from e2d2.model import DiffusionLM
from megatron_ext import optimizer_fixes
from megatron_ext.mapping import ParamMap, Part, initialize_at_seed, param_maps

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
    # context-parallel ranks hold replicas too
    dp_rank = parallel_state.get_data_parallel_rank(with_context_parallel=True)
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
    if prefix != MODEL_PREFIX and not any(k.startswith(prefix) for k in _metadata(directory)):
        raise CheckpointError(f"{directory} has no {prefix}* tensors: the run kept no EMA")
    loaded = dist_checkpointing.load(sharded_state_dict(chunks, prefix), str(directory))
    _copy_into_params(chunks, loaded, prefix)


@dataclass(frozen=True)
class InitReport:
    """How a model's reference tensors met an initial-weights checkpoint (the same on every
    rank): ``loaded`` from it; ``fresh``: missing or of another shape there, drawn at the
    seed; ``dropped``: the checkpoint's tensors this model has no place for (or of another
    shape). Names are reference names, in the model's order (``dropped``: sorted)."""

    directory: str
    loaded: tuple[str, ...]
    fresh: tuple[str, ...]
    dropped: tuple[str, ...]

    @property
    def exact(self) -> bool:
        return not self.fresh and not self.dropped

    def describe(self, seed: int) -> str:
        """One line for the run's log (``seed``: what the fresh tensors were drawn at)."""
        if self.exact:
            return f"checkpoint {self.directory} (all {len(self.loaded)} tensors loaded)"

        def some(names: tuple[str, ...]) -> str:
            return "" if not names else f" ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"

        return (f"checkpoint {self.directory}, not strict: {len(self.loaded)} tensors loaded, "
                f"{len(self.dropped)} dropped{some(self.dropped)}, {len(self.fresh)} freshly "
                f"initialised at seed {seed}{some(self.fresh)}")


def _init_shapes(cfg: ModelConfig, directory: str | Path) -> tuple[dict, dict]:
    """``({reference name: shape}`` of the model, the same of the checkpoint``)``."""
    saved = {k[len(MODEL_PREFIX):]: tuple(v.global_shape)
             for k, v in _metadata(directory).items() if k.startswith(MODEL_PREFIX)}
    with torch.device("meta"):
        wanted = {name: tuple(p.shape) for name, p in DiffusionLM(cfg, seed=0).named_parameters()}
    return wanted, saved


def compare_init(cfg: ModelConfig, directory: str | Path) -> InitReport:
    """Match the reference tensors of ``cfg`` against the checkpoint's (metadata only)."""
    wanted, saved = _init_shapes(cfg, directory)
    fits = [name for name, shape in wanted.items() if saved.get(name) == shape]
    return InitReport(str(directory), tuple(fits),
                      tuple(name for name in wanted if name not in fits),
                      tuple(sorted(name for name in saved if name not in fits)))


def _mismatch(report: InitReport, cfg: ModelConfig) -> ModelMismatchError:
    """The one error for a checkpoint that does not match the model: its first missing or
    mis-shaped tensor, else the first it holds that the model has no place for."""
    wanted, saved = _init_shapes(cfg, report.directory)
    if report.fresh:
        name = report.fresh[0]
        problem = (f"it has no tensor {name!r}" if name not in saved else
                   f"{name} has shape {saved[name]} there, this model needs {wanted[name]}")
    else:
        problem = f"it holds {report.dropped[0]!r}, which this model has no place for"
    return ModelMismatchError(
        f"checkpoint.init={report.directory} does not match this model (variant "
        f"{cfg.variant}): {problem} ({len(report.fresh)} of the model's tensors missing or "
        f"mis-shaped, {len(report.dropped)} of the checkpoint's unused). Set the model section "
        "as it was saved (the checkpoint's config.yaml), or pass checkpoint.init_strict=false "
        "to load the tensors that match and draw the rest at run.seed")


def load_init(chunks: list[torch.nn.Module], cfg: ModelConfig, directory: str | Path, *,
              strict: bool = True, seed: int = 0) -> InitReport:
    """Collective: the initial weights of a new run from ``directory`` (any layout).

    ``strict``: the checkpoint must hold exactly this model's tensors, in its shapes; else
    ``ModelMismatchError`` names the first missing or mis-shaped tensor (or the first one the
    model has no place for). Not strict: every tensor is first drawn at ``seed``, then those
    that match are loaded (a fused parameter part by part); the report says what happened.
    """
    report = compare_init(cfg, directory)
    if strict and not report.exact:
        raise _mismatch(report, cfg)
    if not report.exact:
        for stage in chunks:
            initialize_at_seed(stage, cfg, seed)
    loadable = set(report.loaded)
    template, targets = {}, {}
    for stage in chunks:
        for m, replica_id in _stage_maps(stage):
            for part in m.parts:
                if part.reference_name in loadable:
                    key = MODEL_PREFIX + part.reference_name
                    template[key] = _part_tensor(key, part, part.read(m.param.detach()).clone(),
                                                 replica_id)
                    targets[key] = (m, part)
    loaded = dist_checkpointing.load(template, str(directory)) if template else {}
    with torch.no_grad():
        for key, (m, part) in targets.items():
            part.write(m.param, loaded[key])
    return report


def _copy_into_params(chunks, loaded: dict, prefix: str) -> None:
    with torch.no_grad():
        for stage in chunks:
            for m in param_maps(stage):
                m.param.copy_(loaded[prefix + m.name])


def _metadata(directory: str | Path) -> dict:
    """The checkpoint's tensors' metadata (global shapes), or one clear error."""
    try:
        return dist_checkpointing.load_tensors_metadata(str(directory))
    except Exception as exc:  # noqa: BLE001 - any unreadable metadata is the same user error
        raise CheckpointError(f"{directory} is not a readable checkpoint: {exc}") from None


def _check_shapes(chunks: list[torch.nn.Module], directory: str | Path) -> None:
    """One clear error when the checkpoint holds another model (a missing or resized tensor)."""
    saved = _metadata(directory)
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
    saved = _metadata(directory)
    keys = [k for k in saved if k.startswith(prefix)]
    if names is not None:
        keys = [prefix + n for n in names]
    if not keys:
        raise CheckpointError(f"checkpoint {directory} holds no {prefix}* tensors")
    template = {k: ShardedTensor.from_rank_offsets(
        k, torch.empty(saved[k].global_shape, dtype=saved[k].dtype), replica_id=0) for k in keys}
    loaded = dist_checkpointing.load(template, str(directory))  # also returns the common state
    return {k[len(prefix):]: loaded[k] for k in keys}
