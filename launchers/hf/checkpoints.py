"""Training checkpoints from one process: find one with its run config, read its tensors a
shard at a time (export), write reference weights as one (import).

The format is `megatron_ext.checkpoint`'s (see `launchers.checkpointing` for run
directories): model tensors keyed ``model.{reference name}``, EMA tensors ``ema.{reference
name}``, each a ShardedTensor whose full shape is the reference tensor's, so one process
reads full tensors whatever layout wrote them; the resolved run config is ``config.yaml``
in the iteration directory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from e2d2.config import ModelConfig


@contextlib.contextmanager
def single_process_group() -> Iterator[None]:
    """A gloo world of one for megatron's dist_checkpointing, unless one is already running."""
    if torch.distributed.is_initialized():
        yield
        return
    from megatron_ext import cpu_compat

    cpu_compat.install()
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0,
                                         world_size=1)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


def tensor_mismatch(missing: list[str], unknown: list[str], wrong: list[str] = ()) -> str:
    """``"missing tensors [...]; unknown tensors [...]; shape mismatches [...]"`` for the
    non-empty lists ("" when all are empty), so every such error names each tensor."""
    parts = [f"missing tensors {missing}" if missing else "",
             f"unknown tensors {unknown}" if unknown else "",
             f"shape mismatches [{'; '.join(wrong)}]" if wrong else ""]
    return "; ".join(p for p in parts if p)


class TensorReader:
    """The full tensors under one key prefix of a checkpoint, read on demand.

    ``shapes``: reference name -> ``(shape, dtype)``, from the metadata alone;
    ``read(names)``: just those tensors (`megatron_ext.checkpoint.read_model_state`).
    Needs a process group (`single_process_group`).
    """

    def __init__(self, directory: Path, prefix: str):
        from megatron.core import dist_checkpointing

        self.directory, self.prefix = directory, prefix
        metadata = dist_checkpointing.load_tensors_metadata(str(directory))
        self.shapes = {key[len(prefix):]: (tuple(t.global_shape), t.dtype)
                       for key, t in metadata.items() if key.startswith(prefix)}

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        from megatron_ext.checkpoint import read_model_state

        return read_model_state(self.directory, self.prefix, names)


def save_reference_weights(state: Mapping[str, torch.Tensor], cfg: ModelConfig,
                           directory: Path) -> None:
    """Write full reference tensors as a weights-only checkpoint into the empty ``directory``,
    through the engine's own save on a single-process layout (any layout loads it).
    ``state`` is read one tensor at a time: a lazy mapping keeps one source tensor in memory."""
    from megatron_ext import checkpoint as engine_checkpoint
    from megatron_ext.groups import megatron_layout
    from megatron_ext.layout import ParallelConfig
    from megatron_ext.mapping import load_reference_state
    from megatron_ext.model import build_chunks

    parallel = ParallelConfig(world_size=1)
    with single_process_group(), megatron_layout(parallel):
        stages = build_chunks(cfg, parallel)
        for stage in stages:
            load_reference_state(stage, state)
        engine_checkpoint.save(stages, str(directory))
