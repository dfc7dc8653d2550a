"""The shared-KV training step with its top encoder layer run whole (before issue 17's item
11) and K/V only (`VariantPlan.top_layer_kv_only`, now), beside E2D2 last-hidden.

"Whole" is the shared-KV plan registered under another name with ``top_layer_kv_only``
off: the same model and weights computing the top layer's unused attention output and MLP
(autograd already skipped their backward). One step = the diffusion loss, backward and an
AdamW update of the reference model (`benchmarks.bench_train.make_step`); the variants
run in interleaved rounds, and each round's after/before ratio is paired. Times are this
process's CPU seconds by default (``--clock cpu``, one thread): on a machine shared with
other work, wall time mostly measures the others.

    .venv/bin/python -m benchmarks.bench_shared_kv --threads 1 --repeats 15
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

import torch

from benchmarks.bench_sample import CLOCKS
from benchmarks.bench_train import make_step
from benchmarks.common import (
    add_model_args,
    environment_line,
    interleaved_times,
    model_config,
    setup,
    table,
)
from e2d2 import flops
from e2d2.variants import PLANS, VariantPlan


@dataclasses.dataclass(frozen=True)
class _WholeTopLayer(VariantPlan):
    """Shared-KV as it ran before: the top encoder layer's output computed, then unused."""

    @property
    def top_layer_kv_only(self) -> bool:
        return False


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    args = p.parse_args()
    setup(args)
    shared = PLANS["e2d2_shared_kv"]
    PLANS["e2d2_shared_kv_whole_top"] = _WholeTopLayer(
        **{f.name: getattr(shared, f.name) for f in dataclasses.fields(shared)})
    rows = {"shared-KV, top layer whole (before)": "e2d2_shared_kv_whole_top",
            "shared-KV, top layer K/V only (after)": "e2d2_shared_kv",
            "E2D2 last-hidden": "e2d2"}
    cfgs = {label: model_config(args, variant, args.layers, args.seq_len) for label, variant in rows.items()}
    x0 = torch.randint(0, args.vocab - 1, (args.batch, args.seq_len))
    times = interleaved_times({k: make_step(c, x0) for k, c in cfgs.items()}, args.warmup, args.repeats,
                              CLOCKS[args.clock])
    before = times["shared-KV, top layer whole (before)"]
    print(environment_line(args))
    print(f"hidden {args.hidden}, layers {args.layers} ({args.dec_layers} decoder), L {args.seq_len}, "
          f"batch {args.batch}; {args.warmup} warm-up steps, {args.repeats} interleaved rounds, {args.clock} clock\n")
    out = []
    for label, ts in times.items():
        ratios = sorted(t / b for t, b in zip(ts, before, strict=True))
        decile = max(1, len(ratios) // 10)
        out.append([label, f"{statistics.median(ts) * 1e3:.0f}", f"{statistics.median(ratios):.3f}",
                    f"{ratios[decile - 1]:.3f}-{ratios[-decile]:.3f}"])
    print(table(["model", "step ms (median)", "/ before (paired median)", "p10-p90 of the pairs"], out))
    after = flops.training_flops_per_token(cfgs["shared-KV, top layer K/V only (after)"]).dense
    print(f"\ntraining MFLOP/token (e2d2.flops, what runs): shared-KV {after / 1e6:.2f}, "
          f"E2D2 last-hidden {flops.training_flops_per_token(cfgs['E2D2 last-hidden']).dense / 1e6:.2f}")


if __name__ == "__main__":
    main()
