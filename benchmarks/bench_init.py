"""Peak memory of building a config's model, per rank, against that rank's shard.

Each of ``--world`` gloo ranks (``megatron_ext.testing.spawn_gloo``, one CPU thread each)
builds its chunks of CONFIG's model under the config's TP x PP (``build_chunks``) and
initialises them at ``run.seed``:

* ``--init shards`` (what ``e2d2 pretrain`` does): ``initialize_at_seed``, only this rank's
  shards, drawn a 16 MiB row chunk at a time (``e2d2.init``);
* ``--init full`` (the code before light initialisation): ``reference_state_at_seed``, the
  whole reference model on every rank, then ``load_reference_state`` copies the shard.

Per rank it prints the RSS of the idle process (torch, megatron-core and gloo up, nothing
built), the peak RSS (``ru_maxrss``) after building, the bytes of the rank's parameters,
and peak / shard raw and with the idle RSS subtracted. Goal: at most 1.3.

    .venv/bin/python -m benchmarks.bench_init configs/h100-1b-e2d2.yaml          # ~10 GB in all
    .venv/bin/python -m benchmarks.bench_init configs/h100-1b-e2d2.yaml --init full \\
        model.num_layers=2 model.num_decoder_layers=1     # full 1B x 4 ranks would need ~40 GB
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import time

from benchmarks.common import environment_line, table

MB = 2**20


def _rss_bytes() -> int:
    """Current resident set size of this process (VmRSS)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _body(rank: int, run_config, how: str) -> dict:
    import torch

    from megatron_ext.groups import megatron_layout
    from megatron_ext.layout import ParallelConfig, PipelinePlan
    from megatron_ext.mapping import (
        initialize_at_seed,
        load_reference_state,
        reference_state_at_seed,
    )
    from megatron_ext.model import build_chunks

    model = run_config.model
    parallel = ParallelConfig(torch.distributed.get_world_size(),
                              **dataclasses.asdict(run_config.parallel) | {"fp8": None})
    plan = PipelinePlan(model, parallel)
    with megatron_layout(parallel, get_embedding_ranks=plan.get_embedding_ranks):
        torch.distributed.barrier()
        idle, idle_peak = _rss_bytes(), _peak_rss_bytes()
        start = time.perf_counter()
        stages = build_chunks(model, parallel)
        if how == "shards":
            for stage in stages:
                initialize_at_seed(stage, model, run_config.run.seed)
        else:
            initial = reference_state_at_seed(model, run_config.run.seed)
            for stage in stages:
                load_reference_state(stage, initial)
            del initial
        seconds = time.perf_counter() - start
        shard = sum(p.numel() * p.element_size() for s in stages for p in s.parameters())
        return {"rank": rank, "stage": stages[0].stage, "idle": idle, "idle_peak": idle_peak,
                "peak": _peak_rss_bytes(), "shard": shard, "seconds": seconds}


def main() -> None:
    from launchers.config import load_run_config
    from megatron_ext.testing import spawn_gloo

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    p.add_argument("--init", choices=("shards", "full"), default="shards")
    args = p.parse_intermixed_args()
    cfg = load_run_config(args.config, args.overrides)
    world = cfg.parallel.tensor_parallel * cfg.parallel.pipeline_parallel
    results = spawn_gloo(_body, world, cfg, args.init, timeout_s=1800)
    rows = []
    for r in results:
        rows.append([str(r["rank"]), str(r["stage"]), f"{r['idle'] / MB:.0f}",
                     f"{r['idle_peak'] / MB:.0f}", f"{r['peak'] / MB:.0f}", f"{r['shard'] / MB:.0f}",
                     f"{r['peak'] / r['shard']:.2f}", f"{(r['peak'] - r['idle']) / r['shard']:.2f}",
                     f"{r['seconds']:.1f}"])
    m = cfg.model
    print(f"{args.config} {' '.join(args.overrides)}: {m.num_layers} + {m.num_decoder_layers} "
          f"layers, vocab {m.vocab_size}, hidden {m.hidden_size}; TP{cfg.parallel.tensor_parallel}"
          f" x PP{cfg.parallel.pipeline_parallel}, {world} gloo ranks; --init {args.init}")
    print(table(["rank", "stage", "idle RSS MB", "idle peak MB", "peak RSS MB", "shard MB",
                 "peak / shard", "(peak - idle) / shard", "build s"], rows))
    print(environment_line(args))


if __name__ == "__main__":  # spawn_gloo's workers re-import this module
    main()
