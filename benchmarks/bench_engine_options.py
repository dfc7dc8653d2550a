"""Activation recomputation and precision of the megatron-core engine on this CPU: the memory
the forward pass keeps for the backward pass, and the training step time.

One E2D2 training step (forward, backward, clipped Adam update) at TP1/PP1 through
``megatron_ext.training.train_step``, for ``parallel.recompute`` none / selective /
full, in fp32 and bf16, same model and noised batch, timed interleaved.

"Kept for backward" is the size of the distinct storages autograd saves during the forward
(``torch.autograd.graph.saved_tensors_hooks``; megatron's ``checkpoint`` saves through the
same mechanism): the activation memory that is live when the backward pass starts, which is
what recomputation trades for time. (Process RSS on CPU is dominated by the libraries and
the allocator's cache, so it is not the measure.) Weights, gradients and optimizer state are
the same in every fp32 row.

    .venv/bin/python -m benchmarks.bench_engine_options            # about 1 minute
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import (
    add_model_args,
    e2d2_training_inputs,
    environment_line,
    interleaved_medians,
    setup,
    table,
)

MODES = [("fp32", "none"), ("fp32", "selective"), ("fp32", "full"), ("bf16", "none"),
         ("bf16", "full")]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    return p.parse_args()


def saved_bytes(step) -> int:
    """Bytes of the distinct storages autograd saves in the forward passes of ``step`` (a
    recomputed region saves its own again inside the backward pass, one region at a time,
    freed as it goes: not counted; the backward is told apart by its graph task id)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        if torch._C._current_graph_task_id() == -1:  # not inside a backward pass
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(storages.values())


def main() -> None:
    args = parse_args()
    setup(args)
    from launchers.world import init_world, world_of_one
    from megatron_ext import cpu_compat
    from megatron_ext.engine import build_engine
    from megatron_ext.groups import megatron_layout
    from megatron_ext.layout import ParallelConfig
    from megatron_ext.objective import make_forward_step
    from megatron_ext.training import build_training_optimizer, train_step

    cfg, train, objective, _, batch = e2d2_training_inputs(args)

    cpu_compat.install()
    init_world(world_of_one("local"))
    steps, memory = {}, {}
    with megatron_layout(ParallelConfig(1)):
        for precision, recompute in MODES:
            parallel = ParallelConfig(1, precision=precision, recompute=recompute)
            stages, chunks = build_engine(cfg, parallel)
            optimizer, _ = build_training_optimizer(chunks, parallel, train)
            forward = make_forward_step(objective)

            def step(chunks=chunks, optimizer=optimizer, forward=forward, stages=stages):
                train_step(chunks, optimizer, forward, [batch],
                           seq_length=stages[0].stream_length(), micro_batch_size=args.batch)

            name = f"{precision}, recompute {recompute}"
            memory[name] = saved_bytes(step)
            steps[name] = step
        times = interleaved_medians(steps, args.warmup, args.repeats)
    torch.distributed.destroy_process_group()
    base_t, base_m = times["fp32, recompute none"][0], memory["fp32, recompute none"]
    rows = [[name, f"{memory[name] / 2**20:.1f}", f"{memory[name] / base_m:.2f}",
             f"{t * 1e3:.0f}", f"{spread:.0%}", f"{t / base_t:.2f}"]
            for name, (t, spread) in times.items()]
    print(environment_line(args))
    print(f"E2D2 {cfg.num_layers}+{cfg.num_decoder_layers}, hidden {cfg.hidden_size}, ffn "
          f"{cfg.ffn_hidden_size}, vocab {cfg.vocab_size}, L={cfg.seq_length}, batch "
          f"{args.batch}; {args.warmup} warm-up steps, median of {args.repeats} interleaved rounds\n")
    print(table(["engine step", "kept for backward MiB", "/ fp32 none", "step ms",
                 "p10-p90", "time / fp32 none"], rows))


if __name__ == "__main__":
    main()
