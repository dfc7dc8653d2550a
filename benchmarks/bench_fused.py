"""Tensor-parallel communication and step time of the engine's fused projections against
the unfused ones they replaced.

"unfused" is the engine's attention and MLP as they were before the fusion (commit
d78ec23: q, k, v, gate and up as five column-parallel linears, the reference's projection
hooks), rebuilt here from the same megatron linears and swapped into a stage, so both run
in one process on the same weights (mapped by reference name) and are timed interleaved.
Running this script's counts from a tree of d78ec23 itself gave the same unfused counts.

* All-reduces (``torch.distributed.all_reduce``, which megatron's layers call) during one
  forward and one backward of a TP2 stage on 2 gloo ranks, per encoder layer and per E2D2
  decoder layer: models one layer deeper minus the base model, so the embedding, LM head
  and loss cancel out.
* Training steps (loss, backward, AdamW through megatron's schedule, DDP and optimizer) at
  TP1 on one rank (process CPU time) and TP2 on two ranks (wall time), one thread per rank,
  the two engines interleaved; each round's fused / unfused ratio, and their median.
* The same TP1 step under ``torch.profiler``: the CPU time of every aten op summed per step
  (self time, so nothing counts twice), for each engine, and the ops whose time differs most.
  It does not count time other processes take from the core, so it holds on a loaded machine
  where the wall-clock medians above do not.

    .venv/bin/python -m benchmarks.bench_fused            # about 3 minutes on 2 idle cores
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import time

import torch

from benchmarks.common import (
    add_model_args,
    environment_line,
    interleaved_times,
    median_spread,
    model_config,
    paired_ratio,
    quiet_malloc,
    table,
)
from e2d2.layers import MLP, Attention

ENGINES = ("unfused", "fused")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.set_defaults(layers=6, dec_layers=2, heads=8, kv_heads=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=9)
    return p.parse_args()


def _unfused_stage(stage):
    """``stage`` with every layer's attention and MLP as before the fusion (no weights yet)."""
    from megatron_ext.model import _tagged, linear_classes

    cfg, config = stage.cfg, stage.config
    column, row = linear_classes(config)
    d, h, g = cfg.kv_channels, cfg.num_attention_heads, cfg.num_query_groups
    for layer in [*stage.layers, *getattr(stage, "decoder_layers", [])]:
        attn, mlp = layer.attn, layer.mlp
        attn.__class__ = type("UnfusedAttention", (type(attn),), {
            "qkv_projections": Attention.qkv_projections, "kv_projections": Attention.kv_projections})
        del attn.linear_qkv, attn.linear_kv
        attn.q_proj = column(cfg.hidden_size, h * d, config)
        attn.k_proj = column(cfg.hidden_size, g * d, config)
        attn.v_proj = column(cfg.hidden_size, g * d, config)
        mlp.__class__ = type("UnfusedMLP", (type(mlp),), {"gate_up": MLP.gate_up, "forward": MLP.forward})
        del mlp.linear_fc1
        mlp.gate_proj = column(cfg.hidden_size, cfg.ffn_hidden_size, config)
        mlp.up_proj = column(cfg.hidden_size, cfg.ffn_hidden_size, config)
    return _tagged(stage)


def _stages(cfg, parallel, engine: str):
    from megatron_ext.mapping import load_reference_state, reference_state_at_seed
    from megatron_ext.model import build_chunks

    stages = build_chunks(cfg, parallel)
    if engine == "unfused":
        stages = [_unfused_stage(s) for s in stages]
    for stage in stages:
        load_reference_state(stage, reference_state_at_seed(cfg, 0))
    return stages


def _count_all_reduces(rank: int, cfgs: dict) -> dict:
    """``{engine: {config: {"forward": n, "backward": n}}}`` for one micro-batch at TP2."""
    from megatron_ext.groups import megatron_layout
    from megatron_ext.layout import ParallelConfig
    from megatron_ext.testing import counted_all_reduces

    parallel = ParallelConfig(2, tensor_parallel=2)
    out = {}
    for engine in ENGINES:
        out[engine] = {}
        for name, cfg in cfgs.items():
            with megatron_layout(parallel):
                (stage,) = _stages(cfg, parallel, engine)
                x0 = torch.randint(0, cfg.vocab_size - 1, (1, cfg.seq_length),
                                   generator=torch.Generator().manual_seed(0))
                with counted_all_reduces() as forward:
                    logits = stage({"x0": x0, "xt": torch.full_like(x0, cfg.mask_token_id)})
                with counted_all_reduces() as backward:
                    logits.square().mean().backward()
                out[engine][name] = {"forward": forward[0], "backward": backward[0]}
    return out


def _engine_steps(cfg, parallel, batch_size: int):
    """``(engine, step())`` pairs: one training step of each engine on the same noised batch,
    each engine built only when its pair is drawn (call inside ``megatron_layout(parallel)``)."""
    from e2d2.config import DiffusionConfig
    from e2d2.diffusion import DiffusionObjective
    from megatron_ext.objective import make_forward_step, noised_batch
    from megatron_ext.training import build_optimizer, train_step, wrap_ddp

    objective = DiffusionObjective(cfg, DiffusionConfig())
    x0 = torch.randint(0, cfg.vocab_size - 1, (batch_size, cfg.seq_length),
                       generator=torch.Generator().manual_seed(0))
    batch = noised_batch(objective, x0, generator=torch.Generator().manual_seed(1))
    forward = make_forward_step(objective)
    for engine in ENGINES:
        stages = _stages(cfg, parallel, engine)
        chunks = wrap_ddp(stages, stages[0].config, parallel)
        optimizer = build_optimizer(chunks, parallel, lr=1e-4, weight_decay=0.0, clip_grad=1.0)
        yield engine, functools.partial(train_step, chunks, optimizer, forward, [batch],
                                        seq_length=stages[0].stream_length(),
                                        micro_batch_size=batch_size)


def _time_steps(rank: int, cfg, tp: int, warmup: int, repeats: int, batch_size: int) -> dict:
    """``{engine: [seconds of each round]}`` of training steps at TP ``tp``, interleaved. TP1
    counts this process's CPU time (one thread, no communication: other jobs preempting it do
    not inflate it); TP2 counts wall time, since its all-reduces wait on the other rank."""
    from megatron_ext.groups import megatron_layout
    from megatron_ext.layout import ParallelConfig

    parallel = ParallelConfig(tp, tensor_parallel=tp)
    clock = time.process_time if tp == 1 else time.perf_counter
    with megatron_layout(parallel):
        return interleaved_times(dict(_engine_steps(cfg, parallel, batch_size)), warmup, repeats, clock)


def _profile_steps(rank: int, cfg, warmup: int, steps: int, batch_size: int) -> dict:
    """``{engine: {op: (self CPU ms per step, calls per step)}}`` of TP1 training steps, the
    engines' steps interleaved (a profiler session each) so that a drift in the machine's
    load weighs on both alike."""
    from collections import defaultdict

    from torch.profiler import ProfilerActivity, profile

    from megatron_ext.groups import megatron_layout
    from megatron_ext.layout import ParallelConfig

    parallel = ParallelConfig(1)
    totals = {engine: defaultdict(lambda: [0.0, 0]) for engine in ENGINES}
    with megatron_layout(parallel):
        engines = dict(_engine_steps(cfg, parallel, batch_size))
        for _ in range(warmup):
            for step in engines.values():
                step()
        for _ in range(steps):
            for engine, step in engines.items():
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    step()
                for e in prof.key_averages():
                    totals[engine][e.key][0] += e.self_cpu_time_total / 1e3 / steps
                    totals[engine][e.key][1] += e.count
    return {engine: {op: (ms, calls // steps) for op, (ms, calls) in ops.items()}
            for engine, ops in totals.items()}


def main() -> None:
    args = parse_args()
    quiet_malloc()
    from megatron_ext.testing import spawn_gloo

    base = model_config(args, "e2d2", args.layers, args.seq_len)
    print(environment_line(argparse.Namespace()))
    print(f"E2D2 {base.num_layers}+{base.num_decoder_layers}, hidden {base.hidden_size}, heads "
          f"{base.num_attention_heads}, KV heads {base.num_query_groups}, ffn {base.ffn_hidden_size}")
    small = dict(seq_length=32, vocab_size=64, mask_token_id=63)  # counts do not depend on size
    cfgs = {"base": dataclasses.replace(base, **small),
            "encoder": dataclasses.replace(base, num_layers=base.num_layers + 1, **small),
            "decoder": dataclasses.replace(base, num_decoder_layers=base.num_decoder_layers + 1,
                                           **small)}
    counts = spawn_gloo(_count_all_reduces, 2, cfgs)[0]
    record: dict = {"all_reduces_per_layer": {}}
    rows = []
    for engine in ENGINES:
        c = counts[engine]
        per_layer = {kind: {phase: c[kind][phase] - c["base"][phase] for phase in ("forward", "backward")}
                     for kind in ("encoder", "decoder")}
        record["all_reduces_per_layer"][engine] = per_layer
        rows += [[engine, kind, str(v["forward"]), str(v["backward"])] for kind, v in per_layer.items()]
    print(table(["TP2 all-reduces per layer", "layer", "forward", "backward"], rows))

    rows = []
    for tp in (1, 2):
        rounds = spawn_gloo(_time_steps, tp, base, tp, args.warmup, args.repeats, args.batch)[0]
        for engine in ENGINES:
            median, spread = median_spread(rounds[engine])
            ratio, ratio_spread = paired_ratio(rounds, engine, "unfused")
            rows.append([f"TP{tp}", "CPU" if tp == 1 else "wall", engine, f"{median * 1e3:.0f}",
                         f"{spread:.0%}", f"{ratio:.3f}", f"{ratio_spread:.0%}"])
            record[f"tp{tp}_{engine}_step_ms"] = round(median * 1e3, 1)
            record[f"tp{tp}_{engine}_over_unfused"] = round(ratio, 3)
    print(f"training step, batch {args.batch} x L={args.seq_len}, vocab {base.vocab_size}, "
          f"median of {args.repeats} interleaved rounds after {args.warmup} warm-up, 1 thread per rank")
    print(table(["layout", "clock", "engine", "median ms", "p10-p90", "/ unfused, paired by round",
                 "p10-p90"], rows))

    ops = spawn_gloo(_profile_steps, 1, base, args.warmup, 5, args.batch)[0]
    totals = {engine: sum(ms for ms, _ in ops[engine].values()) for engine in ENGINES}
    record["tp1_profiled_cpu_ms"] = {e: round(t, 1) for e, t in totals.items()}
    print(f"TP1 step under torch.profiler, 5 interleaved steps after {args.warmup} warm-up: self CPU time "
          f"per step, fused {totals['fused']:.1f} ms / unfused {totals['unfused']:.1f} ms = "
          f"{totals['fused'] / totals['unfused']:.3f}; the ops that differ most:")

    def cost(engine: str, op: str) -> tuple[float, int]:
        return ops[engine].get(op, (0.0, 0))

    names = sorted(set(ops["fused"]) | set(ops["unfused"]),
                   key=lambda op: -abs(cost("fused", op)[0] - cost("unfused", op)[0]))[:8]
    print(table(["op", "fused ms", "calls", "unfused ms", "calls"],
                [[op, f"{cost('fused', op)[0]:.1f}", str(cost("fused", op)[1]),
                  f"{cost('unfused', op)[0]:.1f}", str(cost("unfused", op)[1])] for op in names]))
    print(json.dumps(record))


if __name__ == "__main__":
    main()
