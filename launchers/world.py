"""Turn the launch environment into a torch.distributed world.

Minimal version: torchrun variables, or a world of one. (The launch milestone extends
``discover_world`` to SLURM and MPI with the same interface.)
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch


@dataclass(frozen=True)
class World:
    """One process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # "torchrun" | "single"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def discover_world(environ: Mapping[str, str] | None = None) -> World:
    """Read the world from the environment without side effects."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return World(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                     env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)),
                     "torchrun")
    return World(0, 1, 0, "127.0.0.1", free_port(), "single")


def init_world(world: World | None = None, timeout_s: float = 300.0) -> World:
    """``init_process_group`` for ``world`` (discovered when None): NCCL with CUDA, else gloo."""
    world = world or discover_world()
    if world.source == "single":
        print("e2d2: no torchrun/SLURM/MPI environment found: running as a world of one",
              file=sys.stderr)
    os.environ.update(RANK=str(world.rank), WORLD_SIZE=str(world.world_size),
                      LOCAL_RANK=str(world.local_rank), MASTER_ADDR=world.master_addr,
                      MASTER_PORT=str(world.master_port))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(world.local_rank)
    torch.distributed.init_process_group(backend, rank=world.rank, world_size=world.world_size,
                                         timeout=timedelta(seconds=timeout_s))
    return world
