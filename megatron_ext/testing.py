"""Multi-process gloo harness: run a function on N CPU ranks with megatron-core.

Starting a process costs seconds on a 2-core machine (importing torch and
megatron-core dominates), so the intended use is one ``spawn_gloo`` per world
size, with the function looping over several layouts through
``megatron_ext.groups.megatron_layout``.

    def body(rank):
        out = {}
        for layout in (ParallelConfig(2, tensor_parallel=2), ParallelConfig(2, pipeline_parallel=2)):
            with megatron_layout(layout):
                out[layout.name] = ...
        return out

    results = spawn_gloo(body, world_size=2)   # one entry per rank

The function must be importable by name (module level), because workers are
started with the ``spawn`` method.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import socket
import traceback
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.multiprocessing as mp

from megatron_ext import cpu_compat


class WorkerError(RuntimeError):
    """A rank raised; the message carries that rank's traceback."""


def free_port() -> int:
    """A port nothing listens on now (for tests of refused connections and of
    multi-host rendezvous); another process may take it before it is used."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank, world_size, port, fn, args, queue) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        TORCHELASTIC_USE_AGENT_STORE="True",  # the parent hosts the store (spawn_gloo)
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        # One thread per rank: ranks already oversubscribe the cores.
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    cpu_compat.install()
    try:
        torch.distributed.init_process_group(
            "gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=120)
        )
        result = fn(rank, *args)
        queue.put((rank, "ok", pickle.dumps(result)))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def spawn_gloo(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 600.0
) -> list[Any]:
    """Run ``fn(rank, *args)`` on ``world_size`` gloo ranks; return results in rank order.

    Workers start with ``CUDA_VISIBLE_DEVICES=""``: they are CPU ranks on any machine.

    Results must be picklable (move tensors to CPU, detach them). The first rank
    that raises makes this raise ``WorkerError`` with its traceback.

    The ranks rendezvous on a store this process hosts, as ``e2d2 pretrain
    --nproc-per-node`` does (``launchers.local_launch``): bound to port 0, so no other
    world started at the same time (pytest-xdist) can take its port.
    """
    from torch.distributed import TCPStore

    # Alive until this function returns, after every rank has exited.
    store = TCPStore("127.0.0.1", 0, world_size, is_master=True,
                     timeout=timedelta(seconds=timeout_s), wait_for_workers=False)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(rank, world_size, store.port, fn, args, queue), daemon=False)
        for rank in range(world_size)
    ]
    # CPU ranks even on a GPU machine: a spawned child inherits the environment at start,
    # before it imports torch, so CUDA stays invisible to it (and cpu_compat applies).
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        for proc in procs:
            proc.start()
    finally:
        if saved is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved
    results: dict[int, Any] = {}
    errors: list[str] = []
    try:
        for _ in range(world_size):
            rank, status, payload = queue.get(timeout=timeout_s)
            if status == "ok":
                results[rank] = pickle.loads(payload)
            else:
                errors.append(f"rank {rank}:\n{payload}")
                break  # peers of a failed rank block in collectives; stop waiting for them
    finally:
        for proc in procs:
            proc.join(timeout=5 if errors else timeout_s)
            if proc.is_alive():
                proc.kill()
                proc.join()
    if errors:
        raise WorkerError("\n".join(errors))
    return [results[rank] for rank in range(world_size)]


@contextlib.contextmanager
def counted_all_reduces() -> Iterator[list[int]]:
    """Count ``torch.distributed.all_reduce`` calls (megatron's tensor-parallel layers look
    it up at call time) inside the block: yields a one-element list, the running count."""
    count, original = [0], torch.distributed.all_reduce

    def counted(*args, **kwargs):
        count[0] += 1
        return original(*args, **kwargs)

    torch.distributed.all_reduce = counted
    try:
        yield count
    finally:
        torch.distributed.all_reduce = original
