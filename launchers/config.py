"""Run configurations: one YAML file -> validated dataclasses for every part of a run.

A file has the sections ``model``, ``diffusion``, ``train``, ``sampler`` and ``parallel``;
each maps onto its dataclass (`ModelConfig`, `DiffusionConfig`, `TrainConfig`,
`SamplerConfig`, and megatron_ext's `ParallelConfig` less ``world_size``, which is known
only at launch). A missing section takes its defaults; an unknown section or key is one
error naming the file, the section and the fix.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from e2d2.config import DiffusionConfig, ModelConfig
from e2d2.errors import ConfigError
from e2d2.sampling import SamplerConfig
from e2d2.train import TrainConfig

_SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "diffusion": DiffusionConfig,
    "train": TrainConfig,
    "sampler": SamplerConfig,
}
# Parallel keys are checked against megatron_ext.layout.ParallelConfig at launch time,
# where the world size is known; here we only keep them.
PARALLEL_KEYS = ("tensor_parallel", "pipeline_parallel", "encoder_pipeline_stages", "virtual_pipeline",
                 "sequence_parallel", "use_distributed_optimizer", "fp8")


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    parallel: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain data, as written next to checkpoints so a run can be reproduced."""
        out = {name: dataclasses.asdict(getattr(self, name)) for name in _SECTIONS}
        out["train"]["betas"] = list(out["train"]["betas"])
        out["parallel"] = dict(self.parallel)
        return out


def _build(cls: type, values: dict[str, Any], where: str):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys are {sorted(known)}")
    if cls is TrainConfig and "betas" in values:
        values = {**values, "betas": tuple(values["betas"])}
    try:
        return cls(**values)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def run_config_from_dict(data: dict[str, Any], source: str = "<dict>") -> RunConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(data).__name__}")
    unknown = sorted(set(data) - set(_SECTIONS) - {"parallel"})
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {unknown}; valid sections are "
                          f"{sorted([*_SECTIONS, 'parallel'])}")
    parts = {name: _build(cls, data.get(name) or {}, f"{source} [{name}]") for name, cls in _SECTIONS.items()}
    parallel = data.get("parallel") or {}
    bad = sorted(set(parallel) - set(PARALLEL_KEYS))
    if bad:
        raise ConfigError(f"{source} [parallel]: unknown key(s) {bad}; valid keys are {list(PARALLEL_KEYS)}")
    return RunConfig(**parts, parallel=dict(parallel))


def load_run_config(path: str | Path) -> RunConfig:
    """Read and validate a YAML run configuration."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; see configs/ for examples")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    return run_config_from_dict(data, str(path))
