"""The engine of one rank, assembled one way for every caller (``e2d2 pretrain``,
``megatron_ext.verify``, the benchmarks): the model's chunks for the layout
(``build_chunks``), their weights, and megatron's wrapping for training (``wrap_ddp``).
The optimizer is the caller's: pretraining has a schedule, the equivalence check a
constant rate that matches the reference trainer's."""

from __future__ import annotations

from collections.abc import Callable

from megatron.core.distributed import DistributedDataParallel

from e2d2.config import ModelConfig
from megatron_ext.layout import ParallelConfig
from megatron_ext.mapping import initialize_at_seed
from megatron_ext.model import ParallelDiffusionLM, build_chunks
from megatron_ext.training import wrap_ddp


def build_engine(
    cfg: ModelConfig,
    parallel: ParallelConfig,
    *,
    seed: int = 0,
    load: Callable[[list[ParallelDiffusionLM]], None] | None = None,
) -> tuple[list[ParallelDiffusionLM], list[DistributedDataParallel]]:
    """``(stages, chunks)`` of this rank: the unwrapped stages (the handles for the name
    mapping and checkpoints) and the same parameters wrapped for training. The weights are
    ``load(stages)``'s when given (a checkpoint that holds every weight: nothing is drawn
    first), else the reference model's at ``seed``, drawn shard by shard so that only this
    rank's shards are ever in memory. Call inside ``megatron_layout(parallel)``."""
    stages = build_chunks(cfg, parallel)
    if load is not None:
        load(stages)
    else:
        for stage in stages:
            initialize_at_seed(stage, cfg, seed)
    return stages, wrap_ddp(stages, stages[0].config, parallel)
