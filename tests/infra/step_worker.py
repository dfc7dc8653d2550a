"""One rank of a real multi-process training step, for launches by srun / torchrun in tests.

    srun --ntasks=2 python tests/infra/step_worker.py --tp 2
    torchrun --nnodes 2 ... tests/infra/step_worker.py --pp 2 --encoder-stages 1

Each rank: ``launchers.world.init_world()`` (its rank from the launcher's environment),
``log_layout``, then megatron_ext's ``parallel_run`` (megatron's schedules, DDP and optimizer
on the layout, on the tiny E2D2 of ``megatron_ext.verify``). Rank 0 also trains the
single-process reference and compares (``megatron_ext.verify.compare``). Every rank prints
one ``RESULT {json}`` line: its world as discovered, the peers' ranks as gathered over the
process group, the gloo interface, and (rank 0) the mismatches and losses.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys

import torch


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--encoder-stages", type=int)
    p.add_argument("--timeout", type=float, default=120)
    args = p.parse_args()

    from launchers.world import init_world, log_layout
    from megatron_ext import cpu_compat
    from megatron_ext.groups import megatron_layout
    from megatron_ext.layout import ParallelConfig, PipelinePlan
    from megatron_ext.verify import Run, compare, parallel_run, reference_run, tiny_model_config

    torch.set_num_threads(1)
    world = init_world(timeout_s=args.timeout)
    cpu_compat.install()
    cfg = tiny_model_config("e2d2")
    parallel = ParallelConfig(world.world_size, tensor_parallel=args.tp,
                              pipeline_parallel=args.pp, encoder_pipeline_stages=args.encoder_stages)
    plan = PipelinePlan(cfg, parallel)
    with megatron_layout(parallel, get_embedding_ranks=plan.get_embedding_ranks):
        layout = log_layout(plan, sys.stdout)
    run = Run(global_batch=4 * parallel.data_parallel, steps=2)
    mine = parallel_run(cfg, parallel, run)
    everyone: list = [None] * world.world_size
    torch.distributed.all_gather_object(everyone, mine)
    peers: list = [None] * world.world_size
    torch.distributed.all_gather_object(peers, (world.rank, socket.gethostname()))
    result = {"rank": world.rank, "world_size": world.world_size, "source": world.source,
              "local_rank": world.local_rank, "master": f"{world.master_addr}:{world.master_port}",
              "peers": peers, "gloo_ifname": os.environ.get("GLOO_SOCKET_IFNAME"),
              "layout": layout}
    if world.rank == 0:
        reference = reference_run(cfg, run)
        result["mismatches"] = compare(reference, everyone, atol=1e-5, steps_atol=1e-5)
        result["reference_losses"] = reference["losses"]
        result["losses"] = next(r["losses"] for r in everyone if r["first_loss"] is not None)
    print("RESULT " + json.dumps(result), flush=True)
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
