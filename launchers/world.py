"""Turn the launch environment into a torch.distributed world, and report its layout.

One entry point for every launcher, so the same ``e2d2 pretrain`` runs under torchrun,
srun and mpirun:

* ``discover_world`` reads the environment, in this order: torchrun's variables
  (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); a SLURM
  step started by ``srun`` (``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``, rank 0's
  host = the first host of the node list, expanded by ``scontrol show hostnames``); MPI
  (Open MPI's ``OMPI_COMM_WORLD_*``, MPICH/Intel MPI's ``PMI_*``, or mpi4py's COMM_WORLD).
  Otherwise the process is a world of one, and ``init_world`` says why.
* ``init_world`` creates the process group: NCCL with CUDA, gloo without. A rendezvous that
  cannot be reached fails after ``timeout_s`` with one message naming the address, never a
  silent hang.
* ``reported_once`` makes an error raised inside the ranks reach the console once: the first
  rank to hit a ``UserError`` records it in the rendezvous store and reports it; every other
  rank (one with the same error, or one whose collective failed because that rank left) exits
  with code 2 silently.
* ``describe_layout`` / ``log_layout`` (after megatron's ``initialize_model_parallel``)
  report which ranks hold which pipeline stage (encoder or decoder), the TP and DP groups
  and the device of every rank.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, TextIO

import torch

from e2d2.errors import ReportedElsewhere, UserError

if TYPE_CHECKING:
    from megatron_ext.layout import PipelinePlan

DEFAULT_MASTER_PORT = 29500
# Under SLURM without MASTER_PORT, the port is derived from the job id, so that concurrent
# jobs sharing a node do not collide (the sbatch templates export the same value).
SLURM_PORT_BASE, SLURM_PORT_SPAN = 20000, 10000


@dataclass(frozen=True)
class World:
    """One process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # "torchrun" | "slurm" | "mpi" | "single" (discovered), "local" (made in-process)

    def __post_init__(self) -> None:
        if not (0 <= self.rank < self.world_size):
            raise UserError(f"{self.source} environment gives rank {self.rank} of world size "
                            f"{self.world_size}; the rank must be in 0..world_size-1")
        if self.local_rank < 0:
            raise UserError(f"{self.source} environment gives local rank {self.local_rank} < 0")
        if not (0 < self.master_port < 65536):
            raise UserError(f"MASTER_PORT={self.master_port} is not a TCP port (1..65535)")


def slurm_master_port(job_id: int) -> int:
    return SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    value = env.get(name)
    if value is None:
        if default is None:
            raise UserError(f"{name} is not set")
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"{name}={value!r} is not an integer") from None


def first_host(nodelist: str) -> str:
    """First host of a SLURM node list (``node[01-04],gpu7`` -> ``node01``)."""
    if not any(c in nodelist for c in "[],"):
        return nodelist
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, timeout=60, check=True).stdout.split()
    except FileNotFoundError:
        raise UserError(f"SLURM node list {nodelist!r} needs `scontrol show hostnames` to be "
                        "expanded, and scontrol is not on PATH; set MASTER_ADDR") from None
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        raise UserError(f"`scontrol show hostnames {nodelist}` failed ({exc}); set "
                        "MASTER_ADDR to rank 0's host") from None
    if not out:
        raise UserError(f"`scontrol show hostnames {nodelist}` printed no host; set MASTER_ADDR")
    return out[0]


def _slurm(env: Mapping[str, str]) -> World:
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    addr = env.get("MASTER_ADDR") or (first_host(nodelist) if nodelist else None)
    if addr is None:
        raise UserError("SLURM step without SLURM_JOB_NODELIST: set MASTER_ADDR")
    port = _int(env, "MASTER_PORT", slurm_master_port(_int(env, "SLURM_JOB_ID", 0)))
    size = _int(env, "SLURM_STEP_NUM_TASKS", _int(env, "SLURM_NTASKS", 1))
    return World(_int(env, "SLURM_PROCID"), size, _int(env, "SLURM_LOCALID", 0), addr, port,
                 "slurm")


_MPI_VARS = {  # rank, size, local rank
    "OMPI_COMM_WORLD_RANK": ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
                             "OMPI_COMM_WORLD_LOCAL_RANK"),
    "PMI_RANK": ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
}


def _mpi_rank0_host(env: Mapping[str, str]) -> str:
    """MASTER_ADDR for an MPI world: the variable, else rank 0's hostname through mpi4py."""
    if env.get("MASTER_ADDR"):
        return env["MASTER_ADDR"]
    try:
        from mpi4py import MPI
    except ImportError:
        raise UserError("running under MPI without MASTER_ADDR needs mpi4py to find rank 0's "
                        "host: pip install 'e2d2[mpi]', or export MASTER_ADDR") from None
    return MPI.COMM_WORLD.bcast(socket.gethostname(), root=0)


def _mpi(env: Mapping[str, str]) -> World | None:
    for marker, (rank, size, local) in _MPI_VARS.items():
        if marker in env:
            return World(_int(env, rank), _int(env, size), _int(env, local, 0),
                         _mpi_rank0_host(env), _int(env, "MASTER_PORT", DEFAULT_MASTER_PORT),
                         "mpi")
    if "PMIX_RANK" in env:  # PMIx without the Open MPI variables: ask MPI itself
        try:
            from mpi4py import MPI
        except ImportError:
            raise UserError("PMIX_RANK is set (an MPI launch) but mpi4py is not installed: "
                            "pip install 'e2d2[mpi]'") from None
        comm = MPI.COMM_WORLD
        local = comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()
        return World(comm.Get_rank(), comm.Get_size(), local, _mpi_rank0_host(env),
                     _int(env, "MASTER_PORT", DEFAULT_MASTER_PORT), "mpi")
    return None


def world_of_one(source: str = "single") -> World:
    """This process alone (`init_world` gives it an in-memory store: its port is never bound)."""
    return World(0, 1, 0, "127.0.0.1", DEFAULT_MASTER_PORT, source)


def discover_world(environ: Mapping[str, str] | None = None) -> World:
    """Read the world from the environment (torchrun, then srun, then MPI), creating nothing.

    The only outside calls are ``scontrol show hostnames`` for a compressed SLURM node list
    and, for an MPI launch without ``MASTER_ADDR``, mpi4py's broadcast of rank 0's host.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return World(_int(env, "RANK"), _int(env, "WORLD_SIZE"), _int(env, "LOCAL_RANK", 0),
                     env.get("MASTER_ADDR", "127.0.0.1"),
                     _int(env, "MASTER_PORT", DEFAULT_MASTER_PORT), "torchrun")
    # SLURM_PROCID is set in the batch script too (as rank 0 of SLURM_NTASKS): only a step
    # started by srun (SLURM_STEP_ID) is one rank of the job's world.
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        return _slurm(env)
    mpi = _mpi(env)
    if mpi is not None:
        return mpi
    return world_of_one()


def single_reason(environ: Mapping[str, str] | None = None) -> str:
    """Why ``discover_world`` found a world of one, as printed by ``init_world``."""
    env = os.environ if environ is None else environ
    if "SLURM_JOB_ID" in env and "SLURM_STEP_ID" not in env:
        return (f"inside SLURM job {env['SLURM_JOB_ID']} but not in an srun step: running as "
                f"a world of one (start ranks with `srun`, one task per GPU)")
    return ("no torchrun, SLURM (srun) or MPI environment found: running as a world of one "
            "(use torchrun, srun, mpirun or `--nproc-per-node N` for several ranks)")


def _local_address_towards(addr: str, port: int) -> str:
    """The local IP address that the routing table uses to reach ``addr`` (no packet is sent)."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.connect((addr, port))
        return sock.getsockname()[0]


def _interface_of(ip: str) -> str | None:
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address.split("%")[0] == ip for a in addrs):
            return name
    return None


def _resolve(world: World) -> str:
    try:
        infos = socket.getaddrinfo(world.master_addr, world.master_port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UserError(f"MASTER_ADDR={world.master_addr!r} does not resolve ({exc.strerror}); "
                        "set it to rank 0's host name or IP address") from None
    return infos[0][4][0]


def init_world(world: World | None = None, timeout_s: float = 300.0) -> World:
    """``init_process_group`` for ``world`` (discovered when None): NCCL with CUDA, else gloo.

    Without ``GLOO_SOCKET_IFNAME``, gloo ranks use the interface that routes to MASTER_ADDR
    (gloo's own default, the host name's address, is often loopback or absent on a compute
    node). A rendezvous that cannot be reached within ``timeout_s`` is one ``UserError``.
    """
    world = world or discover_world()
    if world.source == "single":
        print(f"e2d2: {single_reason()}", file=sys.stderr)
    if world.world_size > 1:
        # torch's env:// rendezvous reads them. A world of one leaves the environment as it
        # found it: a process that later starts srun or mpirun must not hand its children a
        # torchrun world of one, which would win over their own launcher's variables.
        os.environ.update(RANK=str(world.rank), WORLD_SIZE=str(world.world_size),
                          LOCAL_RANK=str(world.local_rank), MASTER_ADDR=world.master_addr,
                          MASTER_PORT=str(world.master_port))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        count = torch.cuda.device_count()
        if world.local_rank >= count:
            raise UserError(f"local rank {world.local_rank} has no GPU: this node shows {count} "
                            "(start one task per GPU, e.g. srun --ntasks-per-node=<GPUs>)")
        torch.cuda.set_device(world.local_rank)
    if world.world_size > 1:
        ip = _resolve(world)
        if backend == "gloo" and "GLOO_SOCKET_IFNAME" not in os.environ:
            interface = _interface_of(_local_address_towards(ip, world.master_port))
            if interface is not None:
                os.environ["GLOO_SOCKET_IFNAME"] = interface
    # A world of one needs no rendezvous: an in-memory store, so no port is probed, bound or
    # raced for (parallel tests and jobs on one host start many such worlds at once).
    store = torch.distributed.HashStore() if world.world_size == 1 else None
    try:
        torch.distributed.init_process_group(backend, rank=world.rank, world_size=world.world_size,
                                             store=store, timeout=timedelta(seconds=timeout_s))
    except torch.distributed.DistError as exc:  # the store's timeouts and network errors
        reason = str(exc).strip().splitlines()[0]
        raise UserError(
            f"rank {world.rank} of {world.world_size}: no rendezvous at MASTER_ADDR="
            f"{world.master_addr}:{world.master_port} within {timeout_s:g} s ({reason}); check "
            "that MASTER_ADDR is rank 0's host and reachable from every node, that MASTER_PORT "
            "is open and free, and that all ranks were started with the same values") from None
    return world


_USER_ERROR_KEY = "e2d2/user_error"


@contextlib.contextmanager
def reported_once():
    """Inside an initialised world: a ``UserError`` leaves as itself on the first rank to
    raise one (the CLI prints it) and as ``ReportedElsewhere(2)`` on every other rank, as does
    any exception of a rank whose peer recorded a user error (a collective that failed because
    the peer left). The record is made before this rank leaves its process group, so a peer
    that fails on its departure finds it."""
    try:
        yield
    except UserError as exc:
        mine = f"rank {torch.distributed.get_rank()}: {exc}"
        store = torch.distributed.distributed_c10d._get_default_store()
        if store.compare_set(_USER_ERROR_KEY, "", mine) != mine.encode():
            raise ReportedElsewhere(2) from None
        raise
    except Exception:
        if _peer_reported():
            raise ReportedElsewhere(2) from None
        raise


def _peer_reported() -> bool:
    try:
        return torch.distributed.distributed_c10d._get_default_store().check([_USER_ERROR_KEY])
    except Exception:  # noqa: BLE001  the store's host (rank 0 under srun) is gone: no word
        return False


def _device_name() -> str:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        index = torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return "cpu"


def _layers(name: str, layers: range) -> str | None:
    if not len(layers):
        return None
    return f"{name} layers {layers.start}-{layers.stop - 1}"


def _stage_role(plan: PipelinePlan, pp_rank: int) -> str:
    """What pipeline rank ``pp_rank`` holds, chunk by chunk (virtual stages ``v % P == p``)."""
    parts = []
    for v, stage in enumerate(plan.stages()):
        if v % plan.parallel.pipeline_parallel != pp_rank:
            continue
        if plan.model.is_e2d2:
            held = [_layers("encoder", stage.encoder), _layers("decoder", stage.decoder)]
        else:
            held = [_layers("", stage.encoder)]
        held += ["embeds xt" if stage.embeds_noisy else None,
                 "LM head" if stage.holds_head else None]
        chunk = f"chunk {v // plan.parallel.pipeline_parallel}: " if plan.parallel.virtual_pipeline else ""
        parts.append(chunk + ", ".join(h.strip() for h in held if h))
    return "; ".join(parts)


def describe_layout(plan: PipelinePlan) -> str:
    """Every rank's place in the layout, as text (the same on every rank).

    Collective: call on every rank, after megatron's ``initialize_model_parallel`` for
    ``plan.parallel``.
    """
    from megatron.core import parallel_state as ps

    def ranks(group) -> list[int]:
        return torch.distributed.get_process_group_ranks(group)

    mine = {
        "rank": torch.distributed.get_rank(),
        "host": socket.gethostname(),
        "local_rank": int(os.environ.get("LOCAL_RANK", 0)),
        "device": _device_name(),
        "pp": ps.get_pipeline_model_parallel_rank(),
        "tp": ps.get_tensor_model_parallel_rank(),
        "dp": ps.get_data_parallel_rank(),
        "tp_group": ranks(ps.get_tensor_model_parallel_group()),
        "dp_group": ranks(ps.get_data_parallel_group()),
    }
    everyone: list[dict] = [None] * torch.distributed.get_world_size()  # type: ignore[list-item]
    torch.distributed.all_gather_object(everyone, mine)
    par = plan.parallel
    hosts = sorted({r["host"] for r in everyone})
    lines = [f"layout {par.name} ({plan.model.variant}) on {len(everyone)} ranks, "
             f"{len(hosts)} host(s): {', '.join(hosts)}",
             f"  precision: {par.describe_precision()}"]
    for p in range(par.pipeline_parallel):
        holders = [r["rank"] for r in everyone if r["pp"] == p]
        lines.append(f"  pipeline stage {p}: ranks {holders}: {_stage_role(plan, p)}")
    for name in ("tp_group", "dp_group"):
        groups = sorted({tuple(r[name]) for r in everyone})
        label = "tensor-parallel" if name == "tp_group" else "data-parallel"
        lines.append(f"  {label} groups: " + " ".join(str(list(g)) for g in groups))
    lines.append("  device map:")
    for r in everyone:
        lines.append(f"    rank {r['rank']}: {r['host']} local rank {r['local_rank']} "
                     f"{r['device']} (pp {r['pp']}, tp {r['tp']}, dp {r['dp']})")
    return "\n".join(lines)


def log_layout(plan: PipelinePlan, stream: TextIO | None = None) -> str:
    """``describe_layout`` (collective), printed by rank 0; returns the text on every rank."""
    text = describe_layout(plan)
    if torch.distributed.get_rank() == 0:
        print(text, file=stream or sys.stderr, flush=True)
    return text

