"""Run configurations: one YAML file plus ``section.key=value`` overrides -> validated dataclasses.

Sections and their dataclasses:

| section | dataclass | what |
| --- | --- | --- |
| ``model`` | `e2d2.config.ModelConfig` | architecture and variant |
| ``diffusion`` | `e2d2.config.DiffusionConfig` | noise schedule and loss weighting |
| ``train`` | `e2d2.config.TrainConfig` | optimizer, schedule, batch sizes, evaluation |
| ``sampler`` | `e2d2.config.SamplerConfig` | sampling defaults (``e2d2 sample``, export) |
| ``parallel`` | `ParallelSection` | TP / PP / encoder stages / ... (DP comes from the world size) |
| ``run`` | `RunSection` | run directory and seed |
| ``data`` | `DataSection` | preprocessed data directories and blend weights |
| ``checkpoint`` | `CheckpointSection` | save interval, how many to keep, initial weights |
| ``log`` | `LogSection` | logging interval, TensorBoard |

A missing section takes its defaults; an unknown section or key is one error that names it
and lists the valid ones.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from e2d2.config import DiffusionConfig, ModelConfig, SamplerConfig, TrainConfig
from e2d2.errors import ConfigError, require
from megatron_ext.layout import ParallelConfig

AUTO = "auto"  # parallel.encoder_pipeline_stages: the FLOPs-balanced split


class _ParallelSectionRules:
    """What the ``parallel`` section checks and derives before the world size is known.

    ``encoder_pipeline_stages`` is ``auto`` (the default; ``null`` means the same) or a stage
    count. ``auto`` picks the split whose FLOPs-balanced placement is predicted most even
    (`megatron_ext.layout.balanced_encoder_stages`). Where it does not apply (PP1, a
    single-stack variant) any value is ignored, with a note, so that one config runs at
    every layout.
    """

    def __post_init__(self) -> None:
        require(min(self.tensor_parallel, self.pipeline_parallel, self.context_parallel) >= 1,
                "tensor_parallel, pipeline_parallel and context_parallel must be >= 1")
        k = self.encoder_pipeline_stages
        if k is None:
            object.__setattr__(self, "encoder_pipeline_stages", AUTO)
        else:
            require(k == AUTO or (isinstance(k, int) and not isinstance(k, bool)),
                    f"encoder_pipeline_stages={k!r} must be {AUTO} or a stage count")

    @property
    def model_parallel(self) -> int:
        """Ranks one data-parallel replica spans: TP x PP x CP."""
        return self.tensor_parallel * self.pipeline_parallel * self.context_parallel

    def engine(self, world_size: int, precision: str, model: ModelConfig) -> ParallelConfig:
        """The engine's ``ParallelConfig`` for ``world_size`` ranks at ``train.precision``,
        with ``encoder_pipeline_stages`` resolved for ``model``."""
        from megatron_ext.layout import balanced_encoder_stages

        fields = {**dataclasses.asdict(self), "encoder_pipeline_stages": None}
        parallel = ParallelConfig(world_size, precision=precision, **fields)
        k = self.encoder_pipeline_stages
        if not (model.is_e2d2 and parallel.num_stages > 1):
            if k != AUTO:
                _note(f"parallel.encoder_pipeline_stages={k} ignored: it only applies to E2D2 "
                      "with pipeline_parallel > 1")
            return parallel
        if k == AUTO:
            k, _ = balanced_encoder_stages(model, parallel)
        return dataclasses.replace(parallel, encoder_pipeline_stages=k)


def is_first_rank() -> bool:
    """Whether this process is its launcher's first rank (torchrun's ``RANK``, srun's
    ``SLURM_PROCID``; a lone process is), read before any rendezvous: start-up notes that every
    rank would print alike are printed by it alone."""
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"


def _note(message: str) -> None:
    import sys

    if is_first_rank():
        print(f"note: {message}", file=sys.stderr)


# The engine's fields that the section leaves out: the world size is known only at launch,
# and the precision is ``train.precision``.
_LAUNCH_ONLY = ("world_size", "precision")
ParallelSection = dataclasses.make_dataclass(
    "ParallelSection",
    [(f.name, "int | str | None", field(default=AUTO)) if f.name == "encoder_pipeline_stages"
     else (f.name, f.type, field(default=f.default)) for f in dataclasses.fields(ParallelConfig)
     if f.name not in _LAUNCH_ONLY],
    bases=(_ParallelSectionRules,), frozen=True)
ParallelSection.__module__ = __name__
ParallelSection.__doc__ = """`megatron_ext.layout.ParallelConfig`'s fields (the one definition of
each, with its documentation there) less ``world_size`` and ``precision``
(``fp8_recipe``/``fp8_format`` apply when ``train.precision`` is ``fp8``);
``encoder_pipeline_stages`` also takes ``auto``, its default (see ``engine``)."""


@dataclass(frozen=True)
class RunSection:
    dir: str = "runs/default"
    seed: int = 0


@dataclass(frozen=True)
class DataSection:
    """``path``: one directory written by ``e2d2 data preprocess`` or a list of them (a blend,
    with one positive weight each in ``weights``). ``num_workers``: data-loader processes."""

    path: str | list[str] | None = None
    weights: list[float] | None = None
    num_workers: int = 0

    def __post_init__(self) -> None:
        if self.weights is not None:
            require(isinstance(self.path, list) and len(self.weights) == len(self.path)
                    and all(w > 0 for w in self.weights),
                    f"data.weights {self.weights} needs data.path to be a list of as many "
                    "directories, and every weight positive")
        require(self.num_workers >= 0, "data.num_workers must be >= 0")

    @property
    def paths(self) -> list[str]:
        if self.path is None:
            return []
        return [self.path] if isinstance(self.path, str) else list(self.path)


@dataclass(frozen=True)
class CheckpointSection:
    """Save every ``interval`` steps and at the end, keep the newest ``keep``; ``init`` names a
    checkpoint (iteration directory or run directory) whose weights start a new run. It must
    hold exactly the model's tensors unless ``init_strict`` is False: then the tensors that
    match are loaded, the others drawn at ``run.seed``, and the log counts both."""

    interval: int = 1000
    keep: int = 3
    init: str | None = None
    init_strict: bool = True

    def __post_init__(self) -> None:
        require(self.interval > 0, f"checkpoint.interval must be positive, got {self.interval}")
        require(self.keep > 0, f"checkpoint.keep must be positive, got {self.keep}")


WANDB_MODES: tuple[str, ...] = ("online", "offline", "disabled")


@dataclass(frozen=True)
class LogSection:
    """Scalars every ``interval`` steps (TensorBoard, W&B, the plain log line). ``wandb``:
    ``{project, entity, mode}`` turns W&B logging on (off by default; ``mode`` one of
    ``WANDB_MODES``, default online: ``offline`` writes under the run directory only)."""

    interval: int = 10
    tensorboard: bool = True
    wandb: dict[str, str] | None = None

    def __post_init__(self) -> None:
        require(self.interval > 0, f"log.interval must be positive, got {self.interval}")
        if self.wandb is None:
            return
        require(isinstance(self.wandb, dict), "log.wandb must be a mapping {project, entity, "
                f"mode}}, got {self.wandb!r}")
        unknown = sorted(set(self.wandb) - {"project", "entity", "mode"})
        require(not unknown, f"log.wandb: unknown key(s) {unknown}; valid keys are "
                "['entity', 'mode', 'project']")
        require(isinstance(self.wandb.get("project"), str),
                "log.wandb needs project: NAME (the W&B project to log to)")
        require(self.wandb.get("mode", "online") in WANDB_MODES,
                f"log.wandb.mode={self.wandb.get('mode')!r}: choose one of {WANDB_MODES}")


_SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "diffusion": DiffusionConfig,
    "train": TrainConfig,
    "sampler": SamplerConfig,
    "parallel": ParallelSection,
    "run": RunSection,
    "data": DataSection,
    "checkpoint": CheckpointSection,
    "log": LogSection,
}


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    run: RunSection = field(default_factory=RunSection)
    data: DataSection = field(default_factory=DataSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (YAML-safe), as saved in the run directory and next to checkpoints."""
        out = {name: dataclasses.asdict(getattr(self, name)) for name in _SECTIONS}
        out["train"]["betas"] = list(out["train"]["betas"])
        return out

    def replace(self, **sections: Any) -> RunConfig:
        return dataclasses.replace(self, **sections)


def _build(cls: type, values: dict[str, Any], where: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {type(values).__name__}")
    if cls is ParallelSection and "fp8" in values:
        # Before train.precision existed; resolved configs of old runs hold ``fp8: null``.
        values = dict(values)
        if values.pop("fp8") is not None:
            raise ConfigError(f"{where}: parallel.fp8 was replaced by train.precision: fp8 with "
                              "parallel.fp8_recipe (the recipe name)")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys are {sorted(known)}")
    if cls is TrainConfig and "betas" in values:
        values = {**values, "betas": tuple(values["betas"])}
    hints = typing.get_type_hints(cls)
    values = {key: _scalar(value, hints[key], where, key) for key, value in values.items()}
    try:
        return cls(**values)
    except (ConfigError, TypeError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


# What a scalar field's value must be, by its type (`_scalar`).
_SCALARS = {int: "a whole number", float: "a number", bool: "true or false",
            str: "a string (quote it, as YAML quotes '2024')"}


def _scalar(value: Any, hint: Any, where: str, key: str) -> Any:
    """``value`` as the field's scalar type (``int``, ``float``, ``bool``, ``str``, or one of
    them ``| None``), or one `ConfigError` that says what it must be. YAML 1.1 reads ``3e-4``
    (no dot) as a string: a float field takes any string Python reads as a number, an int
    field any whole number (``1e5``). Other types (containers, literals) are left to the
    dataclass's own validation."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        kinds = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None and len(kinds) < len(typing.get_args(hint)):
            return None
        return _scalar(value, kinds[0], where, key) if len(kinds) == 1 else value
    if hint not in _SCALARS:
        return value
    if hint in (int, float) and not isinstance(value, bool):
        try:
            number = float(value) if isinstance(value, str) else value
        except ValueError:
            number = None
        if hint is float and isinstance(number, int | float):
            return float(number)
        if hint is int and isinstance(number, int | float) and float(number).is_integer():
            return int(number)
    elif hint in (bool, str) and isinstance(value, hint):  # a bool is no whole number here
        return value
    raise ConfigError(f"{where}: {key}={value!r} must be {_SCALARS[hint]}")


def run_config_from_dict(data: dict[str, Any], source: str = "<dict>") -> RunConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(data).__name__}")
    unknown = sorted(set(data) - set(_SECTIONS))
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {unknown}; valid sections are "
                          f"{sorted(_SECTIONS)}")
    return RunConfig(**{name: _build(cls, data.get(name) or {}, f"{source} [{name}]")
                        for name, cls in _SECTIONS.items()})


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; see configs/ for examples")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``["train.steps=10", "data.path=out/kjv"]`` applied to a config mapping (values are
    parsed as YAML scalars/lists, so ``true``, ``3e-4`` and ``[1, 2]`` work)."""
    out = {name: dict(values or {}) for name, values in data.items()}
    for item in overrides:
        key, sep, raw = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or not section or not name:
            raise ConfigError(f"override {item!r}: expected section.key=value, for example "
                              "train.steps=100")
        if section not in _SECTIONS:
            raise ConfigError(f"override {item!r}: unknown section {section!r}; valid sections "
                              f"are {sorted(_SECTIONS)}")
        known = {f.name for f in dataclasses.fields(_SECTIONS[section])}
        if name not in known:
            raise ConfigError(f"override {item!r}: unknown key {name!r} in [{section}]; valid "
                              f"keys are {sorted(known)}")
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {exc}") from None
        out.setdefault(section, {})[name] = value
    return out


def load_run_config(path: str | os.PathLike, overrides: list[str] = ()) -> RunConfig:
    """Read and validate a YAML run configuration, with ``section.key=value`` overrides."""
    path = Path(path)
    data = _read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    return run_config_from_dict(apply_overrides(data, list(overrides)), str(path))


def save_run_config(cfg: RunConfig, path: str | os.PathLike) -> None:
    """Write ``cfg`` as YAML atomically (a crash never leaves a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    os.replace(tmp, path)


def override_keys() -> dict[str, list[str]]:
    """Every valid ``section.key``, for help texts and docs."""
    return {name: [f.name for f in dataclasses.fields(cls)] for name, cls in _SECTIONS.items()}


# Sections that define the model a checkpoint holds: a run directory whose saved config
# differs here belongs to another run. (Batch size, steps, logging may change on resume.)
IDENTITY_SECTIONS: tuple[str, ...] = ("model", "diffusion")


def identity_differences(a: RunConfig, b: RunConfig) -> list[str]:
    """``section.key: old -> new`` for every identity key that differs between two configs."""
    diffs = []
    for section in IDENTITY_SECTIONS:
        old, new = dataclasses.asdict(getattr(a, section)), dataclasses.asdict(getattr(b, section))
        diffs += [f"{section}.{k}: {old[k]!r} -> {new[k]!r}" for k in old if old[k] != new[k]]
    return diffs

