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
      train_tokens: [1.0e9, 4.0e9]      #   block_size, train_tokens or train_flops (each
                                        #   -> train.steps; FLOPs counted by e2d2.flops)
    seeds: 2                            # runs per grid point, run.seed = base seed + k
    baselines:                          # optional: other models, trained at every value of
      bd3lm:                            #   the grid's other axes (the same train_flops)
        - model.variant=bd3lm
        - model.num_decoder_layers=0
    sampling_tokens: 1.0e12             # optional: tokens the model will generate over its
                                        #   life (compute-optimal depth with sampling cost)
    output: runs/sweeps/dec-depth       # default: runs/sweeps/<name> (relative to the cwd)
    eval:                               # optional: metrics beyond the run's own NELBO,
      corpora:                          #   computed by `e2d2 sweep collect` per finished run
        kjv-valid: {data: data/kjv}     #   `e2d2 eval` -> <corpus>_nelbo (data relative to
        owt: {data: [a.jsonl, b.jsonl], #   the cwd, as data.path; split, convention, draws,
              convention: document,     #   max_sequences as `e2d2 eval`'s options)
              max_sequences: 256}
      tasks: [kjv_cloze]                # `e2d2 lm-eval` tasks -> <task>_<metric> (acc, ...)
      task_args: {mc_draws: 4, limit: 200}  # mc_draws, limit, num_fewshot, batch_size,
                                        #   include_path (lm-eval's options)
      ema: false                        # evaluate the EMA weights (both kinds)
      overrides: [parallel.pipeline_parallel=1]  # `e2d2 eval`'s section.key=value (layout)
      nproc_per_node: 1                 # `e2d2 eval`'s ranks per run
    slurm:                              # per point job (`e2d2 submit`'s options)
      nodes: 1
      gpus_per_node: 8
      time: "04:00:00"
      array: true                       # one sbatch array (default) or one job per point

Everything is checked when the spec is loaded: an unknown key is named, an empty grid is
refused, and each point is validated as a full run config (and its layout on the job's
world size); an invalid point is named with its config error. The ``eval`` section is
checked too (unknown keys named; a corpus needs ``data``); its data paths are read by
``collect``, which names a missing one before it evaluates anything. Each grid point runs
``seeds`` times: run ``i`` (grid order, then seed) is grid point ``<point>`` with seed ``k``
and trains in ``OUTPUT/points/<point>-seed<k>``.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from e2d2 import flops
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
    "train_flops": ("train.steps", "fl"),
}
BUDGET_AXES = ("train_tokens", "train_flops")  # axes that set train.steps
SPEC_KEYS = ("name", "base", "overrides", "grid", "seeds", "baselines", "sampling_tokens",
             "output", "slurm", "eval")
SLURM_KEYS = ("nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task", "time", "partition",
              "account", "mem", "exclusive", "setup", "array")

EVAL_KEYS = ("corpora", "tasks", "task_args", "ema", "overrides", "nproc_per_node")
CORPUS_KEYS = ("data", "split", "convention", "draws", "max_sequences")
TASK_ARGS = ("mc_draws", "limit", "num_fewshot", "batch_size", "include_path")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class Corpus:
    """One held-out corpus of the ``eval`` section: ``e2d2 eval``'s options."""

    name: str  # its metric is "<name>_nelbo"
    data: tuple[str, ...]  # absolute paths
    split: str = "valid"
    convention: str = "packed"
    draws: int | None = None  # default: the run's train.eval_draws
    max_sequences: int | None = None

    @property
    def metric(self) -> str:
        return f"{self.name}_nelbo"


@dataclass(frozen=True)
class EvalSpec:
    """The spec's ``eval`` section (module docstring); empty when the spec has none."""

    corpora: tuple[Corpus, ...] = ()
    tasks: tuple[str, ...] = ()
    task_args: tuple[tuple[str, Any], ...] = ()  # sorted (key, value) pairs of TASK_ARGS
    ema: bool = False
    overrides: tuple[str, ...] = ()
    nproc_per_node: int = 1

    @property
    def enabled(self) -> bool:
        """Whether there is anything to evaluate."""
        return bool(self.corpora or self.tasks)


@dataclass(frozen=True)
class Point:
    """One training run of the sweep: a grid point (or a baseline) and a seed."""

    index: int  # in run order (the array task index)
    name: str  # the run: "<point>-seed<k>"
    point: str  # the grid point: "dec2-fl1e14", or a baseline's "bd3lm-fl1e14"
    seed: int  # k: run.seed = the base config's run.seed + k
    values: dict[str, int]  # grid axis -> value (a baseline has no decoder_layers)
    config: RunConfig  # the resolved run config, run.dir and run.seed included
    baseline: str | None = None  # the baseline's name, None for the grid's E2D2 points

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
    points: tuple[Point, ...]  # every run
    seeds: int = 1
    sampling_tokens: float = 0.0
    evals: EvalSpec = EvalSpec()

    @property
    def results_dir(self) -> Path:
        return self.output / "results"


def _unknown(where: str, given: Mapping, valid: tuple[str, ...] | Mapping) -> None:
    bad = sorted(set(given) - set(valid))
    if bad:
        raise ConfigError(f"{where}: unknown key(s) {bad}; valid keys are {sorted(valid)}")


def _number(value: Any) -> float | None:
    """A YAML number; also ``4.0e12``, which YAML 1.1 reads as a string (no exponent sign)."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None if isinstance(value, bool) or not isinstance(value, int | float) else value


def _int_value(where: str, value: Any, minimum: int = 1) -> int:
    number = _number(value)
    if number is None or number != int(number) or number < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ConfigError(f"{where}: {value!r} is not {kind}")
    return int(number)


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
    if all(axis in grid for axis in BUDGET_AXES):
        raise ConfigError(f"{where} [grid]: train_tokens and train_flops both set train.steps; "
                          "keep one")
    return grid


def _point_name(values: Mapping[str, int]) -> str:
    def short(v: int) -> str:
        if v >= 10**9:  # FLOPs and token budgets: 1e14, 2.5e9
            mantissa, exponent = f"{v:.3e}".split("e")
            return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
        for unit, scale in (("M", 10**6), ("k", 10**3)):
            if v >= scale and v % scale == 0:
                return f"{v // scale}{unit}"
        return str(v)

    return "-".join(f"{AXES[axis][1]}{short(v)}" for axis, v in values.items())


def _steps(cfg: RunConfig, axis: str, budget: int) -> int:
    """``train.steps`` for a token budget (exact) or a FLOPs budget (the nearest step)."""
    tokens_per_step = cfg.train.batch_size * cfg.model.seq_length
    if axis == "train_tokens":
        if budget % tokens_per_step:
            raise ConfigError(f"train_tokens={budget} is not a whole number of steps of "
                              f"{tokens_per_step} tokens (train.batch_size x model.seq_length)")
        return budget // tokens_per_step
    per_step = flops.training_flops_per_token(cfg.model).masked * tokens_per_step
    steps = round(budget / per_step)
    if steps < 1:
        raise ConfigError(f"train_flops={budget:.3e} is less than one step ({per_step:.3e} "
                          "FLOPs); raise it")
    return steps


def _point_config(base: dict, overrides: list[str], values: Mapping[str, int],
                  run: list[str], source: str) -> RunConfig:
    """The run config of a point: base, spec overrides, the grid values, ``run``'s settings."""
    settings = [f"{AXES[a][0]}={v}" for a, v in values.items() if a not in BUDGET_AXES] + run
    cfg = run_config_from_dict(apply_overrides(base, [*overrides, *settings]), source)
    for axis in BUDGET_AXES:
        if axis in values:
            settings.append(f"train.steps={_steps(cfg, axis, values[axis])}")
            cfg = run_config_from_dict(apply_overrides(base, [*overrides, *settings]), source)
    return cfg


def _sampling_tokens(where: str, value: Any) -> float:
    number = _number(value)
    if number is None or number < 0:
        raise ConfigError(f"{where}: sampling_tokens={value!r} must be a number >= 0 (tokens "
                          "generated over the model's life, e.g. 1.0e12)")
    return float(number)


def _baselines(where: str, raw: Any) -> dict[str, list[str]]:
    raw = raw or {}
    if not isinstance(raw, Mapping) or not all(
            isinstance(v, list) and all(isinstance(o, str) for o in v) for v in raw.values()):
        raise ConfigError(f"{where} [baselines]: expected name: [section.key=value, ...], e.g. "
                          "bd3lm: [model.variant=bd3lm, model.num_decoder_layers=0]")
    return {str(name): list(v) for name, v in raw.items()}


def _corpus(where: str, name: Any, raw: Any) -> Corpus:
    where = f"{where} [eval.corpora.{name}]"
    if not _NAME.match(str(name)):
        raise ConfigError(f"{where}: a corpus name is letters, digits, '_', '.' or '-' (it "
                          "names the metric <name>_nelbo)")
    if not isinstance(raw, Mapping) or "data" not in raw:
        raise ConfigError(f"{where}: expected a mapping with data: PATH (or a list of paths), "
                          "e.g. {data: data/kjv, split: valid}")
    _unknown(where, raw, CORPUS_KEYS)
    data = raw["data"] if isinstance(raw["data"], list) else [raw["data"]]
    if not data or not all(isinstance(d, str) and d for d in data):
        raise ConfigError(f"{where}: data is a path or a list of paths, got {raw['data']!r}")
    choices = {"split": ("valid", "train"), "convention": ("packed", "document")}
    for key, valid in choices.items():
        if raw.get(key, valid[0]) not in valid:
            raise ConfigError(f"{where}: {key}={raw[key]!r}; choose one of {list(valid)}")
    counts = {key: None if raw.get(key) is None else _int_value(f"{where} {key}", raw[key])
              for key in ("draws", "max_sequences")}
    return Corpus(str(name), tuple(str(Path(d).resolve()) for d in data),
                  raw.get("split", "valid"), raw.get("convention", "packed"), **counts)


def _eval_spec(where: str, raw: Any) -> EvalSpec:
    if raw is None:
        return EvalSpec()
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} [eval]: expected a mapping with keys {list(EVAL_KEYS)}")
    _unknown(f"{where} [eval]", raw, EVAL_KEYS)
    corpora = raw.get("corpora") or {}
    if not isinstance(corpora, Mapping):
        raise ConfigError(f"{where} [eval.corpora]: expected name: {{data: PATH, ...}}")
    tasks = raw.get("tasks") or []
    tasks = [tasks] if isinstance(tasks, str) else tasks
    if not isinstance(tasks, list) or not all(isinstance(t, str) and _NAME.match(t)
                                              for t in tasks):
        raise ConfigError(f"{where} [eval.tasks]: expected a list of lm-eval task names, e.g. "
                          "[kjv_cloze]")
    task_args = raw.get("task_args") or {}
    if not isinstance(task_args, Mapping):
        raise ConfigError(f"{where} [eval.task_args]: expected a mapping, e.g. "
                          "{mc_draws: 4, limit: 200}")
    _unknown(f"{where} [eval.task_args]", task_args, TASK_ARGS)
    args = {}
    for key, value in task_args.items():
        if key == "include_path":
            args[key] = str(Path(str(value)).resolve())
        else:  # counts; num_fewshot may be 0
            args[key] = _int_value(f"{where} [eval.task_args] {key}", value,
                                   minimum=0 if key == "num_fewshot" else 1)
    overrides = raw.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise ConfigError(f"{where} [eval.overrides]: expected a list of section.key=value "
                          "strings for `e2d2 eval` (e.g. - parallel.pipeline_parallel=1)")
    if not isinstance(raw.get("ema", False), bool):
        raise ConfigError(f"{where} [eval]: ema={raw['ema']!r}; expected true or false")
    metrics = [_corpus(where, name, c) for name, c in corpora.items()]
    return EvalSpec(tuple(metrics), tuple(dict.fromkeys(tasks)), tuple(sorted(args.items())),
                    raw.get("ema", False), tuple(overrides),
                    _int_value(f"{where} [eval] nproc_per_node", raw.get("nproc_per_node", 1)))


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
    seeds = _int_value(f"{where}: seeds", raw.get("seeds", 1))
    sampling_tokens = _sampling_tokens(where, raw.get("sampling_tokens", 0))
    baselines = _baselines(where, raw.get("baselines"))
    evals = _eval_spec(where, raw.get("eval"))  # before the points' (slower) validation
    slurm = dict(raw.get("slurm") or {})
    _unknown(f"{where} [slurm]", slurm, SLURM_KEYS)
    array = bool(slurm.pop("array", True))
    resources = Resources(**slurm)
    name = str(raw.get("name") or path.stem)
    output = Path(raw.get("output") or f"runs/sweeps/{name}").resolve()

    base_seed = run_config_from_dict(apply_overrides(base, overrides), str(base_path)).run.seed
    others = {a: v for a, v in grid.items() if a != "decoder_layers"}
    combos = [(None, dict(zip(grid, c, strict=True))) for c in itertools.product(*grid.values())]
    combos += [(b, dict(zip(others, c, strict=True))) for b in baselines
               for c in itertools.product(*others.values())]
    points = []
    for baseline, values in combos:
        point_name = "-".join(filter(None, [baseline, _point_name(values)]))
        label = f"{where}: point {point_name} ({', '.join(f'{a}={v}' for a, v in values.items())})"
        for k in range(seeds):
            run_name = f"{point_name}-seed{k}"
            run = [f"run.dir={output / 'points' / run_name}", f"run.seed={base_seed + k}"]
            try:
                config = _point_config(base, [*overrides, *baselines.get(baseline, [])], values,
                                       run, str(base_path))
                validate_layout(config, resources.world_size, str(base_path))
            except ConfigError as exc:
                raise ConfigError(f"{label} is invalid: {exc}") from None
            points.append(Point(len(points), run_name, point_name, k, values, config, baseline))
    return SweepSpec(path, name, base_path, output, resources, array, grid, tuple(points),
                     seeds, sampling_tokens, evals)
