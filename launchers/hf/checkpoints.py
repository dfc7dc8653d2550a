"""Training checkpoints from one process: find them, read their tensors a few at a time,
write new ones (for ``import-hf``).

A run directory holds ``config.yaml`` and ``checkpoints/latest``, a text file naming the
newest complete ``checkpoints/iter_NNNNNNN/``. Each iter directory is a megatron-core
``dist_checkpointing`` directory with the resolved run config as ``config.yaml`` beside its
files. Model tensors are keyed ``model.{reference name}`` and EMA tensors ``ema.{reference
name}`` (the names of `e2d2.model.DiffusionLM`), each a ShardedTensor whose full shape is
the reference tensor's, so one process reads full tensors whatever layout wrote them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from e2d2.config import ModelConfig
from e2d2.errors import ConfigError, UserError

MODEL_PREFIX, EMA_PREFIX = "model.", "ema."
CONFIG_NAME = "config.yaml"


@dataclass(frozen=True)
class TrainedCheckpoint:
    """One iter directory, its run directory (None for a lone checkpoint) and run config."""

    directory: Path
    run_dir: Path | None
    config: dict[str, Any]

    @property
    def model_config(self) -> ModelConfig:
        section = self.config.get("model") or {}
        try:
            return ModelConfig(**section)
        except (TypeError, ConfigError) as exc:
            raise ConfigError(f"{self.directory / CONFIG_NAME} [model]: {exc}") from None


def tensor_mismatch(missing: list[str], unknown: list[str], wrong: list[str] = ()) -> str:
    """``"missing tensors [...]; unknown tensors [...]; shape mismatches [...]"`` for the
    non-empty lists ("" when all are empty), so every such error names each tensor."""
    parts = [f"missing tensors {missing}" if missing else "",
             f"unknown tensors {unknown}" if unknown else "",
             f"shape mismatches [{'; '.join(wrong)}]" if wrong else ""]
    return "; ".join(p for p in parts if p)


def _is_dist_checkpoint(path: Path) -> bool:
    return (path / "metadata.json").is_file()


def locate(path: str | Path) -> TrainedCheckpoint:
    """A run directory (its ``checkpoints/latest``) or an iter directory -> the checkpoint."""
    path = Path(path)
    latest = path / "checkpoints" / "latest"
    if latest.is_file():
        name = latest.read_text().strip()
        directory, run_dir = path / "checkpoints" / Path(name).name, path
        if not _is_dist_checkpoint(directory):
            raise UserError(f"{latest} names {name!r}, but {directory} is not a complete "
                            "checkpoint (no metadata.json); pass an iter directory explicitly")
    elif _is_dist_checkpoint(path):
        directory = path
        parent = path.parent.parent
        run_dir = parent if path.parent.name == "checkpoints" and (parent / CONFIG_NAME).is_file() else None
    else:
        raise UserError(f"{path} is neither a run directory (with checkpoints/latest) nor a "
                        "checkpoint directory (with metadata.json)")
    for candidate in (directory / CONFIG_NAME, None if run_dir is None else run_dir / CONFIG_NAME):
        if candidate is not None and candidate.is_file():
            config = yaml.safe_load(candidate.read_text()) or {}
            if not isinstance(config, dict):
                raise ConfigError(f"{candidate}: expected a mapping of config sections")
            return TrainedCheckpoint(directory, run_dir, config)
    raise UserError(f"{directory} has no {CONFIG_NAME} (and no run directory with one): the "
                    "model configuration is needed to read it")


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


class TensorReader:
    """Full tensors under one key prefix of a dist checkpoint, read on demand.

    ``shapes`` maps each reference name to ``(shape, dtype)`` from the metadata alone;
    ``read(names)`` loads just those tensors. Needs a process group (`single_process_group`).
    """

    def __init__(self, directory: Path, prefix: str):
        from megatron.core import dist_checkpointing

        self.directory, self.prefix = directory, prefix
        metadata = dist_checkpointing.load_tensors_metadata(str(directory))
        self.shapes = {key[len(prefix):]: (tuple(t.global_shape), t.dtype)
                       for key, t in metadata.items() if key.startswith(prefix)}

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing import ShardedTensor

        request = {}
        for name in names:
            shape, dtype = self.shapes[name]
            key = self.prefix + name
            request[name] = ShardedTensor.from_rank_offsets(key, torch.empty(shape, dtype=dtype),
                                                            replica_id=0)
        return dist_checkpointing.load(request, str(self.directory))


def save_tensors(tensors: dict[str, torch.Tensor], directory: Path, prefix: str = MODEL_PREFIX) -> None:
    """Write full tensors as a dist checkpoint keyed ``prefix + name`` into the empty
    ``directory`` (needs a process group). Any layout loads it: each tensor is one shard."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    sharded = {prefix + name: ShardedTensor.from_rank_offsets(prefix + name, t.contiguous(), replica_id=0)
               for name, t in tensors.items()}
    dist_checkpointing.save(sharded, str(directory))
