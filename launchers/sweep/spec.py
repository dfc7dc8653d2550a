"""Sweep specs: a base config and a grid, expanded into fully validated training configs.

A spec is a YAML file::

    name: dec-depth                     # default: the file's stem
    base: ../tiny-cpu.yaml              # run config, relative to the spec file
    overrides:                          # section.key=value, as on the command line,
      - train.steps=2000                #   applied to every point
      - data.path=data/owt
    grid:                               # the cross product is the set of points
      decoder_layers: [1, 2, 4, 8]      # required: the sweep is over decoder depth
      encoder_layers: [12]              # optional axes: encoder_layers, hidden_size,
      train_tokens: [1.0e9, 4.0e9]      #   block_size, train_tokens (-> train.steps)
    output: runs/sweeps/dec-depth       # default: runs/sweeps/<name> (relative to the cwd)
    slurm:                              # per point job (`e2d2 submit`'s options)
      nodes: 1
      gpus_per_node: 8
      time: "04:00:00"
      array: true                       # one sbatch array (default) or one job per point

Everything is checked when the spec is loaded: an unknown key is named, an empty grid is
refused, and each point is validated as a full run config (and its layout on the job's
world size); an invalid point is named with its config error. Point ``i`` (grid order)
trains in ``OUTPUT/points/<name>``.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from e2d2.errors import ConfigError
from launchers.config import RunConfig, apply_overrides, run_config_from_dict
from launchers.submit import Resources, validate_layout

# grid axis -> (config key, short name used in point names)
AXES: dict[str, tuple[str, str]] = {
    "decoder_layers": ("model.num_decoder_layers", "dec"),
    "encoder_layers": ("model.num_layers", "enc"),
    "hidden_size": ("model.hidden_size", "h"),
    "block_size": ("model.block_size", "bs"),
    "train_tokens": ("train.steps", "tok"),
}
SPEC_KEYS = ("name", "base", "overrides", "grid", "output", "slurm")
SLURM_KEYS = ("nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task", "time", "partition",
              "account", "array")


@dataclass(frozen=True)
class Point:
    """One training run of the sweep."""

    index: int
    name: str
    values: dict[str, int]  # grid axis -> value
    config: RunConfig  # the resolved run config, run.dir included

    @property
    def run_dir(self) -> Path:
        return Path(self.config.run.dir)


@dataclass(frozen=True)
class SweepSpec:
    path: Path
    name: str
    base: Path
    output: Path
    resources: Resources
    array: bool
    grid: dict[str, tuple[int, ...]]
    points: tuple[Point, ...]

    @property
    def results_dir(self) -> Path:
        return self.output / "results"


def _unknown(where: str, given: Mapping, valid: tuple[str, ...] | Mapping) -> None:
    bad = sorted(set(given) - set(valid))
    if bad:
        raise ConfigError(f"{where}: unknown key(s) {bad}; valid keys are {sorted(valid)}")


def _int_value(where: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value) \
            or value < 1:
        raise ConfigError(f"{where}: {value!r} is not a positive integer")
    return int(value)


def _grid(where: str, raw: Any) -> dict[str, tuple[int, ...]]:
    if not isinstance(raw, Mapping) or not raw:
        raise ConfigError(f"{where}: the grid is empty; give at least decoder_layers: [..]")
    _unknown(f"{where} [grid]", raw, AXES)
    grid = {}
    for axis in AXES:  # fixed axis order: point names and indices do not depend on the file
        if axis not in raw:
            continue
        values = raw[axis] if isinstance(raw[axis], list) else [raw[axis]]
        if not values:
            raise ConfigError(f"{where} [grid]: {axis} is an empty list; the grid would be empty")
        ints = tuple(_int_value(f"{where} [grid] {axis}", v) for v in values)
        if len(set(ints)) != len(ints):
            raise ConfigError(f"{where} [grid]: {axis} lists a value twice: {list(ints)}")
        grid[axis] = ints
    if "decoder_layers" not in grid:
        raise ConfigError(f"{where} [grid]: decoder_layers is required (the sweep is over "
                          "decoder depth; other axes are crossed with it)")
    return grid


def _point_name(values: Mapping[str, int]) -> str:
    def short(v: int) -> str:
        for unit, scale in (("G", 10**9), ("M", 10**6), ("k", 10**3)):
            if v >= scale and v % scale == 0:
                return f"{v // scale}{unit}"
        return str(v)

    return "-".join(f"{AXES[axis][1]}{short(v)}" for axis, v in values.items())


def _point_config(base: dict, overrides: list[str], values: Mapping[str, int],
                  run_dir: Path, source: str) -> RunConfig:
    settings = [f"{AXES[a][0]}={v}" for a, v in values.items() if a != "train_tokens"]
    settings += [f"run.dir={run_dir}"]
    cfg = run_config_from_dict(apply_overrides(base, [*overrides, *settings]), source)
    if "train_tokens" in values:
        per_step = cfg.train.batch_size * cfg.model.seq_length
        tokens = values["train_tokens"]
        if tokens % per_step:
            raise ConfigError(f"train_tokens={tokens} is not a whole number of steps of "
                              f"{per_step} tokens (train.batch_size x model.seq_length)")
        settings.append(f"train.steps={tokens // per_step}")
        cfg = run_config_from_dict(apply_overrides(base, [*overrides, *settings]), source)
    return cfg


def load_spec(path: str | Path) -> SweepSpec:
    """Read, expand and validate a sweep spec (see the module docstring)."""
    path = Path(path).resolve()
    if not path.is_file():
        raise ConfigError(f"sweep spec {path} does not exist; see configs/sweeps/ for an example")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: a sweep spec is a mapping with keys {list(SPEC_KEYS)}")
    where = str(path)
    _unknown(where, raw, SPEC_KEYS)
    if "base" not in raw:
        raise ConfigError(f"{where}: no base config: set base: PATH (relative to the spec)")
    base_path = (path.parent / str(raw["base"])).resolve()
    if not base_path.is_file():
        raise ConfigError(f"{where}: base config {base_path} does not exist")
    base = yaml.safe_load(base_path.read_text()) or {}
    overrides = raw.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise ConfigError(f"{where} [overrides]: expected a list of section.key=value strings "
                          "(e.g. - train.steps=1000)")
    grid = _grid(where, raw.get("grid"))
    slurm = dict(raw.get("slurm") or {})
    _unknown(f"{where} [slurm]", slurm, SLURM_KEYS)
    array = bool(slurm.pop("array", True))
    resources = Resources(**slurm)
    name = str(raw.get("name") or path.stem)
    output = Path(raw.get("output") or f"runs/sweeps/{name}").resolve()

    points = []
    for index, combo in enumerate(itertools.product(*grid.values())):
        values = dict(zip(grid, combo, strict=True))
        point_name = _point_name(values)
        label = f"{where}: point {point_name} ({', '.join(f'{a}={v}' for a, v in values.items())})"
        try:
            config = _point_config(base, overrides, values, output / "points" / point_name,
                                   str(base_path))
            validate_layout(config, resources.world_size, str(base_path))
        except ConfigError as exc:
            raise ConfigError(f"{label} is invalid: {exc}") from None
        points.append(Point(index, point_name, values, config))
    return SweepSpec(path, name, base_path, output, resources, array, grid, tuple(points))
