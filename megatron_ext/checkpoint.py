"""Sharded checkpoints with megatron-core's dist_checkpointing, keyed by reference names.

Every tensor is saved under its reference-model name with its tensor-parallel slice as
the shard, so a checkpoint written under one TP/PP layout loads under any other, and a
TP1/PP1 load is the reference state dict. Replicas (data-parallel copies, norms repeated
over TP ranks, word-embedding copies on several pipeline stages) get distinct
``replica_id``s with exactly one main copy, which dist_checkpointing writes once.
"""

from __future__ import annotations

from pathlib import Path

import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing import ShardedTensor

from megatron_ext.mapping import param_maps


def sharded_state_dict(chunks: list[torch.nn.Module]) -> dict[str, ShardedTensor]:
    """This rank's parameters (all model chunks) as ShardedTensors keyed by reference name."""
    return {key: tensor for stage in chunks for key, tensor in _stage_shards(stage).items()}


def _stage_shards(stage: torch.nn.Module) -> dict[str, ShardedTensor]:
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    embedding_stages = stage.plan.embedding_stages()
    out = {}
    for m in param_maps(stage):
        # Only the word embedding lives on several stages; the first holder is the main copy.
        pp_copy = embedding_stages.index(stage.stage) if m.reference_name == "embed.weight" else 0
        if m.tp_axis is None:
            out[m.reference_name] = ShardedTensor.from_rank_offsets(
                m.reference_name, m.param, replica_id=(pp_copy, tp_rank, dp_rank))
        else:
            out[m.reference_name] = ShardedTensor.from_rank_offsets(
                m.reference_name, m.param, (m.tp_axis, tp_rank, tp),
                replica_id=(pp_copy, 0, dp_rank))
    return out


def save(chunks: list[torch.nn.Module], directory: str) -> None:
    """Collective over all ranks: write this layout's shards to an empty ``directory``.

    Raises FileExistsError on a non-empty directory: dist_checkpointing would mix the new
    shards with the old metadata.
    """
    path = Path(directory)
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"checkpoint directory {directory} is not empty; use a new one")
    torch.distributed.barrier()  # every rank has checked before any rank writes
    path.mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(sharded_state_dict(chunks), directory)


def load(chunks: list[torch.nn.Module], directory: str) -> None:
    """Collective over all ranks: fill this rank's model chunks from a checkpoint of any layout."""
    loaded = dist_checkpointing.load(sharded_state_dict(chunks), directory)
    with torch.no_grad():
        for stage in chunks:
            for m in param_maps(stage):
                m.param.copy_(loaded[m.reference_name])
