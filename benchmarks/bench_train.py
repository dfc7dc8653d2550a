"""Training step time of E2D2 against BD3-LM and MDLM on this CPU, beside the FLOPs ratios.

One step = the diffusion loss forward, backward and an AdamW update. Every variant has the
same total depth N (E2D2: N - N_dec encoder + N_dec decoder layers), plus BD3-LM with N/2
layers, the paper's train-matched baseline of an E2D2 with N layers. Each measured time is
printed as a ratio to E2D2's, beside the analytic training-FLOPs ratio, counted dense (what
SDPA with a dense boolean mask computes on CPU) and with the masks' true density.

A second table times SDPA alone on BD3-LM's attention shape with different masks, which shows
whether the CPU kernel skips masked-out work (it decides which FLOPs count is the right one).

    .venv/bin/python -m benchmarks.bench_train            # defaults: about 2 minutes
    .venv/bin/python -m benchmarks.bench_train --seq-len 512 --batch 2 --hidden 512
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks.common import (
    add_model_args,
    environment_line,
    interleaved_medians,
    model_config,
    setup,
    table,
)
from e2d2 import flops, masks
from e2d2.config import DiffusionConfig
from e2d2.diffusion import DiffusionObjective
from e2d2.model import DiffusionLM


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=9)
    return p.parse_args()


def rows_of(args: argparse.Namespace) -> dict[str, tuple[str, int]]:
    """Benchmark rows: label -> (variant, total layers)."""
    n = args.layers
    return {
        f"E2D2 {n - args.dec_layers}+{args.dec_layers}": ("e2d2", n),
        f"BD3-LM {n}": ("bd3lm", n),
        f"MDLM {n}": ("mdlm", n),
        f"BD3-LM {n // 2} (train-matched)": ("bd3lm", n // 2),
    }


def make_step(cfg, x0: torch.Tensor):
    """A closure running one training step (loss, backward, AdamW) of a fresh model of ``cfg``."""
    model = DiffusionLM(cfg)
    objective = DiffusionObjective(cfg, DiffusionConfig())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        objective.loss(model, x0, generator=gen).backward()
        opt.step()

    return step


def training_table(args: argparse.Namespace) -> str:
    rows = rows_of(args)
    cfgs = {label: model_config(args, v, n, args.seq_len) for label, (v, n) in rows.items()}
    x0 = torch.randint(0, args.vocab - 1, (args.batch, args.seq_len))
    timed = interleaved_medians({k: make_step(c, x0) for k, c in cfgs.items()}, args.warmup, args.repeats)
    counts = {k: flops.training_flops_per_token(c) for k, c in cfgs.items()}
    ref = next(iter(rows))
    tokens = x0.numel()
    out = []
    for label in rows:
        sec, spread = timed[label]
        fl = counts[label]
        out.append([
            label, f"{sec * 1e3:.0f}", f"{spread:.0%}",
            f"{sec / timed[ref][0]:.2f}", f"{fl.dense / counts[ref].dense:.2f}", f"{fl.masked / counts[ref].masked:.2f}",
            f"{fl.dense * tokens / 1e9:.1f}", f"{fl.dense * tokens / sec / 1e9:.1f}",
            f"{(fl.attention_dense + fl.lm_head) / fl.dense:.0%}",
        ])
    headers = ["model", "step ms", "p10-p90", "time / E2D2", "FLOPs dense / E2D2", "FLOPs masked / E2D2",
               "GFLOP/step (dense)", "GFLOP/s (dense)", "attn+head share"]
    return table(headers, out)


def attention_table(args: argparse.Namespace) -> str:
    """SDPA forward + backward on BD3-LM's ``[2L, 2L]`` attention with several masks."""
    L, S, h, g = args.seq_len, args.block, args.heads, args.kv_heads
    d = args.hidden // h
    q = torch.randn(args.batch, h, 2 * L, d, requires_grad=True)
    k, v = (torch.randn(args.batch, g, 2 * L, d, requires_grad=True) for _ in range(2))
    variants = {
        "no mask": {},
        "dense all-True mask": {"attn_mask": torch.ones(2 * L, 2 * L, dtype=torch.bool)},
        f"BD3-LM mask (density {flops.mask_density(masks.BD3LM, L, S):.2f})": {"attn_mask": masks.bd3lm(L, S)},
        "is_causal=True (density 0.50)": {"is_causal": True},
    }

    def run(kwargs):
        return lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kwargs).sum().backward()

    timed = interleaved_medians({name: run(kw) for name, kw in variants.items()}, args.warmup, args.repeats)
    base = timed["no mask"][0]
    rows = [[name, f"{sec * 1e3:.1f}", f"{sec / base:.2f}"] for name, (sec, _) in timed.items()]
    return table(["SDPA fwd+bwd, [2L, 2L]", "ms", "time / no mask"], rows)


def main() -> None:
    args = parse_args()
    setup(args)
    print(environment_line(args))
    print(f"hidden {args.hidden}, ffn {3 * args.hidden}, heads {args.heads}/{args.kv_heads}, vocab {args.vocab}, "
          f"L {args.seq_len}, block {args.block}, batch {args.batch}; "
          f"{args.warmup} warm-up steps, median of {args.repeats} interleaved rounds\n")
    print(training_table(args))
    print()
    print(attention_table(args))


if __name__ == "__main__":
    main()
