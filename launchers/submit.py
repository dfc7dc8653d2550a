"""``e2d2 submit CONFIG [overrides]``: render ``slurm/pretrain.sbatch`` and submit it.

The config and its overrides are validated, and the layout checked against the job's world
size (nodes x tasks per node), before anything is written or submitted. ``--dry-run``
prints the rendered script and submits nothing. ``e2d2 sweep submit`` renders the same
template (``render_pretrain``) once per point or once for an array.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from e2d2.errors import ConfigError, UserError

if TYPE_CHECKING:
    from launchers.config import RunConfig

TEMPLATE_DIR = Path(__file__).resolve().parents[1] / "slurm"
_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")  # sbatch --time: [D-]H[:M[:S]] or minutes
_MEM = re.compile(r"^\d+[KMGT]?$")  # sbatch --mem: a size with an optional unit
_FIELD = re.compile(r"\{\{(\w+)\}\}")


@dataclass(frozen=True)
class Resources:
    """What one job asks SLURM for, and how its batch shell prepares the environment.

    ``tasks_per_node`` defaults to one task per GPU (one without GPUs), since every task is
    one rank. ``exclusive`` (default: whenever the job asks for GPUs) gives the job whole
    nodes, with all their memory unless ``mem`` says otherwise; ``cpus_per_task`` then
    defaults to the node's CPUs shared among its ranks (computed on the node, where the core
    count is known), which is also each rank's ``OMP_NUM_THREADS``. ``mem`` is sbatch's
    ``--mem`` per node (``0``: all of it). ``setup`` is a file sourced, or a command run, in
    the batch shell before ``srun`` (``module load ...``, a venv or conda activation).
    """

    nodes: int = 1
    gpus_per_node: int = 8
    tasks_per_node: int | None = None
    cpus_per_task: int | None = None
    time: str = "24:00:00"
    partition: str | None = None
    account: str | None = None
    mem: str | None = None
    exclusive: bool | None = None
    setup: str | None = None

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise ConfigError(f"nodes must be >= 1, got {self.nodes}")
        if self.gpus_per_node < 0:
            raise ConfigError(f"gpus_per_node must be >= 0, got {self.gpus_per_node}")
        for name in ("tasks_per_node", "cpus_per_task"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        if not _TIME.match(str(self.time)):
            raise ConfigError(f"time {self.time!r} is not a SLURM time limit "
                              "(e.g. 04:00:00, 2-00:00:00 or minutes)")
        if self.mem is not None and not _MEM.match(str(self.mem)):
            raise ConfigError(f"mem {self.mem!r} is not a SLURM memory size "
                              "(e.g. 0 for all of the node's, 512G, 200000M)")
        if self.exclusive is None:
            object.__setattr__(self, "exclusive", self.gpus_per_node > 0)

    @property
    def ntasks_per_node(self) -> int:
        return self.tasks_per_node or max(self.gpus_per_node, 1)

    @property
    def world_size(self) -> int:
        return self.nodes * self.ntasks_per_node

    def directives(self) -> str:
        lines = [f"--nodes={self.nodes}", f"--ntasks-per-node={self.ntasks_per_node}",
                 f"--time={self.time}"]
        if self.gpus_per_node:
            lines.append(f"--gpus-per-node={self.gpus_per_node}")
        if self.cpus_per_task:
            lines.append(f"--cpus-per-task={self.cpus_per_task}")
        if self.exclusive:
            lines.append("--exclusive")
        mem = self.mem if self.mem is not None else ("0" if self.exclusive else None)
        if mem is not None:
            lines.append(f"--mem={mem}")
        if self.partition:
            lines.append(f"--partition={self.partition}")
        if self.account:
            lines.append(f"--account={self.account}")
        return "\n".join(f"#SBATCH {line}" for line in lines)


def render(template: str, fields: Mapping[str, str]) -> str:
    """Fill the ``{{name}}`` fields of a template in ``slurm/``; every field must be given."""
    path = TEMPLATE_DIR / template
    if not path.is_file():
        raise UserError(f"sbatch template {path} is missing; it ships in the repository's slurm/")
    text = path.read_text()
    missing = sorted(set(_FIELD.findall(text)) - set(fields))
    if missing:
        raise ValueError(f"{template}: no value for field(s) {missing}")
    return _FIELD.sub(lambda m: str(fields[m.group(1)]), text)


def e2d2_command() -> list[str]:
    """This installation's ``e2d2``, independent of the job's PATH."""
    return [sys.executable, "-m", "launchers.cli"]


def bash_array(name: str, words: Sequence[str]) -> str:
    return f"{name}=({' '.join(shlex.quote(str(w)) for w in words)})"


def job_setup(run_dir: Path, train: Sequence[str], after: Sequence[str] = ()) -> str:
    """The bash lines that tell ``pretrain.sbatch`` what to run."""
    return "\n".join([f"RUN_DIR={shlex.quote(str(run_dir))}", bash_array("TRAIN", train),
                      bash_array("AFTER", after)])


def environment_setup(resources: Resources, env: Mapping[str, str]) -> str:
    """The batch shell's lines before ``srun``: ``resources.setup`` (a file is sourced, else
    the text runs as a command; either failing stops the job), then ``export`` of ``env``."""
    lines = []
    if resources.setup:
        setup = Path(resources.setup).expanduser()
        command = (f"source {shlex.quote(str(setup.resolve()))}" if setup.is_file()
                   else resources.setup)
        lines += ["# --- environment setup (--setup)",
                  f'{command} || {{ echo "e2d2: the --setup step failed (exit $?)"; exit 1; }}']
    lines += [f"export {key}={shlex.quote(str(value))}" for key, value in env.items()]
    return "\n".join(lines)


def config_env(cfg: RunConfig) -> dict[str, str]:
    """Environment variables the config needs on the compute nodes: megatron's overlap of
    gradient reduce / parameter gather (and TP/SP communication) with compute relies on
    ``CUDA_DEVICE_MAX_CONNECTIONS=1``, which makes kernels run in issue order."""
    parallel = cfg.parallel
    overlapped = (parallel.overlap_grad_reduce or parallel.overlap_param_gather
                  or parallel.tensor_parallel > 1 or parallel.sequence_parallel)
    return {"CUDA_DEVICE_MAX_CONNECTIONS": "1"} if overlapped else {}


def render_pretrain(job_name: str, resources: Resources, log: str, setup: str,
                    array: str | None = None, env: Mapping[str, str] | None = None) -> str:
    """``slurm/pretrain.sbatch`` for one job (or an array); ``env`` (``config_env``) is
    exported before ``srun``."""
    from launchers.preemption import PREEMPTED_EXIT_CODE  # the template requeues on it

    directives = resources.directives()
    if array is not None:
        directives += f"\n#SBATCH --array={array}"
    return render("pretrain.sbatch", {
        "job_name": job_name, "resources": directives, "log": log, "job_setup": setup,
        "environment": environment_setup(resources, env or {}),
        "preempted_code": str(PREEMPTED_EXIT_CODE),
    })


def require_sbatch() -> str:
    path = shutil.which("sbatch")
    if path is None:
        raise UserError("sbatch is not on PATH: submit from a SLURM login node (or load its "
                        "module), use --dry-run to see the script, or --local for a sweep")
    return path


def sbatch(*args: str) -> str:
    """``sbatch --parsable ARGS`` (options, then a script or ``--wrap=...``); the job id."""
    done = subprocess.run([require_sbatch(), "--parsable", *args], capture_output=True,
                          text=True, timeout=120)
    if done.returncode != 0:
        raise UserError(f"sbatch {shlex.join(args)} failed: "
                        f"{done.stderr.strip() or done.stdout.strip()}")
    return done.stdout.strip().split(";")[0]


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


# ----------------------------------------------------------------------- configs


def validate_layout(cfg: RunConfig, world_size: int, source: str) -> None:
    """The layout check ``e2d2 pretrain`` makes at start, made before submitting. A config
    that needs Transformer Engine is checked without it where TE is missing (login nodes
    rarely have it), with a warning: the compute nodes need it, and the run fails there with
    a clear error if they lack it."""
    from megatron_ext.layout import PipelinePlan, transformer_engine_available

    section, precision = cfg.parallel, cfg.train.precision
    impl = section.transformer_impl or ("transformer_engine" if precision == "fp8" else "local")
    if impl == "transformer_engine" and not transformer_engine_available():
        print(f"warning: {source}: train.precision={precision} with Transformer Engine, which "
              "is not installed here; the compute nodes need transformer-engine[pytorch]",
              file=sys.stderr)
        # the same checks with megatron's local linears standing in for TE's
        section, precision = dataclasses.replace(section, transformer_impl="local"), (
            "bf16" if precision == "fp8" else precision)
    try:
        PipelinePlan(cfg.model, section.engine(world_size, precision, cfg.model))
    except ConfigError as exc:
        raise ConfigError(f"{source}: layout on {world_size} ranks: {exc}") from None


def validate_data(cfgs: Sequence[RunConfig]) -> None:
    """The data directories (and tokenizer/vocabulary fit) the runs will read, checked once."""
    from launchers.inputs import load_run_tokenizer

    seen = set()
    for cfg in cfgs:
        key = (tuple(cfg.data.paths), cfg.model.vocab_size)
        if key not in seen:
            seen.add(key)
            load_run_tokenizer(cfg)


# ----------------------------------------------------------------------- CLI


def add_resource_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8, help="0 for CPU nodes")
    p.add_argument("--tasks-per-node", type=int, help="ranks per node (default: one per GPU)")
    p.add_argument("--cpus-per-task", type=int,
                   help="CPUs per rank (default: the node's CPUs / its ranks, on whole nodes)")
    p.add_argument("--mem", help="memory per node, e.g. 512G (default: all of it, on whole "
                   "nodes)")
    p.add_argument("--exclusive", action=argparse.BooleanOptionalAction, default=None,
                   help="whole nodes (default: yes when the job asks for GPUs)")
    p.add_argument("--setup", metavar="FILE_OR_COMMAND",
                   help="sourced (a file) or run (a command) in the batch shell before srun, "
                        "e.g. 'module load cuda/12.4 && source ~/venv/bin/activate'")
    p.add_argument("--time", default="24:00:00", help="time limit, e.g. 04:00:00")
    p.add_argument("--partition")
    p.add_argument("--account")


def resources_from_args(args: argparse.Namespace) -> Resources:
    return Resources(nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                     tasks_per_node=args.tasks_per_node, cpus_per_task=args.cpus_per_task,
                     time=args.time, partition=args.partition, account=args.account,
                     mem=args.mem, exclusive=args.exclusive, setup=args.setup)


def register(subparsers) -> None:
    p = subparsers.add_parser("submit", help="submit `e2d2 pretrain CONFIG` as a SLURM job",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML run config")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    add_resource_options(p)
    p.add_argument("--job-name", help="default: e2d2-<run directory name>")
    p.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from launchers.config import load_run_config

    resources = resources_from_args(args)
    config_path = Path(args.config).resolve()
    cfg = load_run_config(config_path, args.overrides)
    validate_layout(cfg, resources.world_size, args.config)
    validate_data([cfg])
    run_dir = Path(cfg.run.dir).resolve()
    logs = run_dir.parent / "slurm-logs"
    name = args.job_name or f"e2d2-{run_dir.name}"
    train = [*e2d2_command(), "pretrain", str(config_path), *args.overrides, "--resume", "auto"]
    script = render_pretrain(name, resources, str(logs / f"{run_dir.name}-%j.log"),
                             job_setup(run_dir, train), env=config_env(cfg))
    if args.dry_run:
        print(script, end="")
        return 0
    require_sbatch()
    path = logs / f"{run_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}.sbatch"
    write_text_atomic(path, script)
    job = sbatch(str(path))
    print(f"submitted job {job}: {resources.world_size} ranks; run directory {run_dir}; "
          f"log {logs / f'{run_dir.name}-{job}.log'}")
    return 0
