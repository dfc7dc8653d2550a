"""The engine of one rank, assembled one way for every caller (``e2d2 pretrain``,
``megatron_ext.verify``, the benchmarks): the model's chunks for the layout
(``build_chunks``), their weights, and megatron's wrapping for training (``wrap_ddp``).
The optimizer is the caller's: pretraining has a schedule, the equivalence check a
constant rate that matches the reference trainer's."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from megatron.core.distributed import DistributedDataParallel

from e2d2.config import ModelConfig
from megatron_ext.checkpoint import load, load_init
from megatron_ext.layout import ParallelConfig
from megatron_ext.mapping import initialize_at_seed
from megatron_ext.model import ParallelDiffusionLM, build_chunks
from megatron_ext.training import wrap_ddp


def build_engine(
    cfg: ModelConfig,
    parallel: ParallelConfig,
    *,
    seed: int = 0,
    init: str | Path | None = None,
    init_strict: bool = True,
    trained: tuple[str | Path, str] | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[list[ParallelDiffusionLM], list[DistributedDataParallel]]:
    """``(stages, chunks)`` of this rank: the unwrapped stages (the handles for the name
    mapping and checkpoints) and the same parameters wrapped for training.

    The weights are the checkpoint ``init``'s (`megatron_ext.checkpoint.load_init`: one that
    holds every weight of this model and nothing else, unless ``init_strict`` is False), or a
    trained checkpoint's, ``trained = (directory, prefix)``: its model (``MODEL_PREFIX``) or
    EMA (``EMA_PREFIX``) tensors as they are, nothing drawn first (an evaluation); else the
    reference model's at ``seed``, drawn shard by shard so that only this rank's shards are
    ever in memory. ``log`` gets one line saying where they came from. Call inside
    ``megatron_layout(parallel)``."""
    if init is not None and trained is not None:
        raise ValueError("build_engine takes init or trained weights, not both")
    stages = build_chunks(cfg, parallel)
    if trained is not None:
        directory, prefix = trained
        load(stages, str(directory), prefix)
        source = f"the {prefix.rstrip('.')} tensors of {directory}"
    elif init is not None:
        source = load_init(stages, cfg, init, strict=init_strict, seed=seed).describe(seed)
    else:
        for stage in stages:
            initialize_at_seed(stage, cfg, seed)
        source = f"drawn at seed {seed}"
    if log is not None:
        log(f"initial weights: {source}")
    return stages, wrap_ddp(stages, stages[0].config, parallel)
