"""Sampling throughput of E2D2, BD3-LM and MDLM on this CPU, at batch 1 and batch 8.

All models have the same total depth N (E2D2: N - N_dec encoder + N_dec decoder layers) and
random weights: throughput does not depend on what the weights say, because the ``topk``
strategy reveals a fixed number of tokens per step (``--steps`` per block; the default, one
token per step, is the paper's throughput setting) and no EOS stops a row early.

* E2D2 and BD3-LM use the block KV cache: a step runs the decoder (E2D2) or the whole stack
  (BD3-LM) on one block against the cached clean keys, plus one clean pass per block.
* MDLM has no block KV cache: it denoises prompt + completion as one block, with a full
  forward per step. It gets as many steps as completion tokens, so its NFE per generated
  token matches the others'.

    .venv/bin/python -m benchmarks.bench_sample            # defaults: about 1 minute
    .venv/bin/python -m benchmarks.bench_sample --new-tokens 256 --batches 1 8 32
"""

from __future__ import annotations

import argparse
from functools import partial

import torch

from benchmarks.common import (
    add_model_args,
    environment_line,
    interleaved_medians,
    model_config,
    setup,
    table,
)
from e2d2 import flops
from e2d2.model import DiffusionLM
from e2d2.sampling import SamplerConfig, sample


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=None, help="steps per block (default: block size)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    return p.parse_args()


def models_of(args: argparse.Namespace) -> dict[str, tuple[DiffusionLM, SamplerConfig]]:
    """label -> (model, its sampler settings)."""
    n, steps = args.layers, args.steps or args.block
    # MDLM's one block is the whole completion: scale its steps to the same NFE per token.
    mdlm_steps = args.new_tokens * steps // args.block
    # seq_length only has to be a valid config (a multiple of the block); sampling ignores it.
    seq_len = args.block * (-(-(args.prompt_len + args.new_tokens) // args.block))
    out = {}
    for label, variant in [(f"E2D2 {n - args.dec_layers}+{args.dec_layers}", "e2d2"),
                           (f"BD3-LM {n}", "bd3lm"), (f"MDLM {n} (no cache)", "mdlm")]:
        model = DiffusionLM(model_config(args, variant, n, seq_len)).eval()
        sampler = SamplerConfig(strategy="topk", steps=mdlm_steps if variant == "mdlm" else steps,
                                temperature=1.0, max_new_tokens=args.new_tokens)
        out[label] = (model, sampler)
    return out


def main() -> None:
    args = parse_args()
    setup(args)
    print(environment_line(args))
    print(f"hidden {args.hidden}, ffn {3 * args.hidden}, heads {args.heads}/{args.kv_heads}, vocab {args.vocab}, "
          f"block {args.block}; prompt {args.prompt_len}, {args.new_tokens} new tokens, strategy topk; "
          f"{args.warmup} warm-up runs, median of {args.repeats} interleaved rounds\n")
    models = models_of(args)
    g = torch.Generator().manual_seed(0)
    ref = next(iter(models))
    for batch in args.batches:
        prompt = torch.randint(0, args.vocab - 1, (batch, args.prompt_len), generator=g)
        nfe = {k: sample(m, prompt, s, g).nfe_per_block for k, (m, s) in models.items()}
        runs = {k: partial(sample, m, prompt, s, g) for k, (m, s) in models.items()}
        timed = interleaved_medians(runs, args.warmup, args.repeats)
        counts = {k: flops.sampling_flops_per_token(m.cfg, args.prompt_len, args.new_tokens, nfe[k])
                  for k, (m, _) in models.items()}
        rows = []
        for label in models:
            sec, spread = timed[label]
            tok_s = batch * args.new_tokens / sec
            fl = counts[label].dense
            rows.append([
                label, f"{sum(nfe[label])}", f"{sum(nfe[label]) / len(nfe[label]):.0f}",
                f"{tok_s:.0f}", f"{spread:.0%}", f"{timed[ref][0] / sec:.2f}",
                f"{fl / 1e6:.1f}", f"{counts[ref].dense / fl:.2f}", f"{tok_s * fl / 1e9:.2f}",
            ])
        headers = ["model", "NFE", "NFE/block", "tokens/s", "p10-p90", "speed / E2D2",
                   "MFLOP/token", "FLOPs E2D2 / model", "GFLOP/s"]
        print(f"batch {batch}")
        print(table(headers, rows))
        print()


if __name__ == "__main__":
    main()
