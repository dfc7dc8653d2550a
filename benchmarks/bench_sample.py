"""Sampling throughput on this CPU: E2D2, BD3-LM, AR (and MDLM) at batch 1 and batch 8.

Defaults are the reference code's tiny config (vocab 1001, hidden 128, FFN 384, 4 heads,
2 KV heads, L = 256, S = 4, tied embeddings): E2D2 4+2 and BD3-LM 4, a prompt of 16 tokens,
128 new tokens, T = S steps per block. The reference code measured 484 (E2D2) and 365
(BD3-LM) tokens/s at batch 1 on this machine; the goals (issue 10) are 2x those at batch 1,
batch 8 at least 5x batch 1, and per-step overhead below 30% of a batch-1 denoising step.

Random weights: throughput does not depend on what they say, because the ``topk`` strategy
reveals a fixed number of tokens per step and no EOS stops a row early.

* E2D2 and BD3-LM use the block KV cache: a step runs the decoder (E2D2) or the whole stack
  (BD3-LM) on one block against the cached clean keys, plus one clean pass per block.
* AR (``--baseline-layers`` layers) samples one token per forward with its KV cache.
* MDLM (``--mdlm``) has no block KV cache: one block over prompt + completion, a full forward
  per step, as many steps as completion tokens (the same NFE per token as the others).

* ``--before`` adds E2D2 and BD3-LM rows that run the *layer-by-layer* path the sampler
  used before its inference path (`e2d2.layers.TransformerLayer.infer`): every step and every
  commit through the training layers (`run_layers`), same weights, timed interleaved with the
  others in the same process, so their ratio holds on a loaded machine where the absolute
  tokens/s (and the ratio to the reference code's fixed figures) do not.

Times are CPU seconds of this process by default (``--clock cpu``): on a machine shared with
other jobs, wall time swings 4x with their load while CPU time does not count the time other
jobs hold the core. With ``--threads 1`` (and on a quiet machine) the two agree, so the ratio
to the reference code's figures stays meaningful; ``--clock wall`` gives elapsed time.

Per-step overhead: the profiler's ``sample.step`` regions (one denoising step: model forward,
distribution, reveal, bookkeeping) against the ``sample.forward`` regions inside them (the
model alone); overhead = 1 - forward / step, at batch 1. The table also counts the top-level
aten ops dispatched per step, inside and outside the forward (the batch-1 cost driver).

    .venv/bin/python -m benchmarks.bench_sample --threads 1 --before   # about 2 minutes
    .venv/bin/python -m benchmarks.bench_sample --new-tokens 256 --batches 1 8 32 --mdlm
    .venv/bin/python -m benchmarks.bench_sample --threads 1 --op-growth 12   # + which ops grow with the batch
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import (
    add_model_args,
    environment_line,
    interleaved_times,
    median_spread,
    model_config,
    paired_ratio,
    setup,
    table,
)
from e2d2 import flops
from e2d2.layers import KVSlot, run_layers
from e2d2.model import BlockForward, DiffusionLM, KVCache
from e2d2.sampling import SamplerConfig, sample

REFERENCE_TOKENS_PER_S = {"e2d2": 484.0, "bd3lm": 365.0}  # the authors' code, batch 1, this CPU
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.set_defaults(hidden=128, vocab=1001, layers=6, dec_layers=2, threads=2)
    p.add_argument("--baseline-layers", type=int, default=4, help="BD3-LM / AR / MDLM depth")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--steps", type=int, default=None, help="steps per block (default: block size)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--mdlm", action="store_true", help="also time MDLM (slow: no block cache)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                   help="cpu: this process's CPU seconds (robust to other jobs on a shared machine; "
                        "use with --threads 1); wall: elapsed seconds")
    p.add_argument("--before", action="store_true",
                   help="also time the layer-by-layer path (the sampler before its inference path)")
    p.add_argument("--op-growth", type=int, default=0, metavar="N",
                   help="also list the N aten ops with the most self CPU time at the largest batch, "
                        "against batch 1 (which work grows with the rows)")
    return p.parse_args()


# ------------------------------------------------------------------ the path before (--before)
class LayerByLayerForward(BlockForward):
    """A step as the sampler ran it before the inference path: the training layers one by one,
    RoPE looked up per step, fresh cache slots per step."""

    def __call__(self, xt: torch.Tensor) -> torch.Tensor:
        model = self.model
        slots = [KVSlot(slot.k, slot.v, slot.start, slot.rows) for slot in self.slots]
        h, _ = run_layers([layer for layer, _ in self.layers], model.embed(xt), model._rope(self.positions),
                          self.mask, slots)
        return model.logits(h)


def encode_layer_by_layer(model: DiffusionLM, tokens: torch.Tensor, cache: KVCache, positions: torch.Tensor,
                          mask: torch.Tensor | None = None, keep: int | None = None) -> torch.Tensor:
    """`DiffusionLM.encode` as it was before the inference path (the training layers)."""
    cfg, n = model.cfg, tokens.shape[1]
    rope = model._rope(positions)
    h, _ = run_layers(model.layers, model.embed(tokens), rope, mask, cache.slots(cache.layers))
    if cfg.variant == "e2d2":
        h_enc, end = model.encoder_norm(h), cache.length + n
        for k, (dk, dv) in enumerate(cache.decoder):
            dk[:, :, cache.length:end], dv[:, :, cache.length:end] = model.decoder_layer(k).kv(h_enc, rope)
    cache.length += n if keep is None else keep
    return h


def layer_by_layer(model: DiffusionLM) -> DiffusionLM:
    """A copy of ``model`` (same weights) whose sampling runs the layer-by-layer path."""
    before = DiffusionLM(model.cfg).eval()
    before.load_state_dict(model.state_dict())
    before.block_forward = partial(LayerByLayerForward, before)
    before.encode = partial(encode_layer_by_layer, before)
    return before


def models_of(args: argparse.Namespace) -> dict[str, tuple[DiffusionLM, SamplerConfig]]:
    """label -> (model, its sampler settings)."""
    steps = args.steps or args.block
    seq_len = max(args.seq_len, args.block * (-(-(args.prompt_len + args.new_tokens) // args.block)))
    n_base = args.baseline_layers
    plan = [(f"E2D2 {args.layers - args.dec_layers}+{args.dec_layers}", "e2d2", args.layers, steps),
            (f"BD3-LM {n_base}", "bd3lm", n_base, steps), (f"AR {n_base} (KV cache)", "ar", n_base, 1)]
    if args.mdlm:  # its one block is the whole completion: scale its steps to the same NFE per token
        plan.append((f"MDLM {n_base} (no cache)", "mdlm", n_base, args.new_tokens * steps // args.block))
    out = {}
    for label, variant, layers, n_steps in plan:
        model = DiffusionLM(model_config(args, variant, layers, seq_len)).eval()
        sampler = SamplerConfig(strategy="topk", steps=n_steps, temperature=1.0, max_new_tokens=args.new_tokens)
        out[label] = (model, sampler)
        if args.before and variant in ("e2d2", "bd3lm"):
            out[f"{label} (before)"] = (layer_by_layer(model), sampler)
    return out


def step_overhead(model: DiffusionLM, prompt: torch.Tensor, sampler: SamplerConfig,
                  runs: int = 3) -> tuple[float, float, tuple[float, float], int, float, float]:
    """At this batch, over ``runs`` profiled runs: (median ms of a denoising step, median share of
    it outside the model forward, that share's (min, max), steps, top-level aten ops per step
    inside the forward, outside it).

    A profiled warm-up run comes first and is not counted: the profiler's first run pays its
    own start-up (the event buffers grow, first-touch allocations), which inflated the share
    outside the forward by 2-3 points against every later run."""
    def profiled():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            sample(model, prompt, sampler, seeds=list(range(prompt.shape[0])))
        return prof.events()

    sample(model, prompt, sampler, seeds=list(range(prompt.shape[0])))  # warm
    profiled()
    ms, shares = [], []
    for _ in range(runs):
        events = profiled()
        steps = [e for e in events if e.name == "sample.step"]
        forwards = [e for e in events if e.name == "sample.forward"]
        step_us = sum(e.cpu_time_total for e in steps)
        ms.append(step_us / len(steps) / 1e3)
        shares.append(1.0 - sum(e.cpu_time_total for e in forwards) / step_us)

    def ops_under(regions) -> int:  # aten ops whose nearest profiled parent is one of ``regions``
        ids = {id(e) for e in regions}
        return sum(1 for e in events if e.name.startswith("aten::") and e.cpu_parent is not None
                   and id(e.cpu_parent) in ids)

    n = len(steps)
    return (statistics.median(ms), statistics.median(shares), (min(shares), max(shares)), n,
            ops_under(forwards) / n, ops_under(steps) / n)


def self_times(model: DiffusionLM, prompt: torch.Tensor, sampler: SamplerConfig) -> dict[str, tuple[float, int]]:
    """aten op -> (self CPU ms, calls) of one profiled sampling run (after a warm one)."""
    sample(model, prompt, sampler, seeds=list(range(prompt.shape[0])))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        sample(model, prompt, sampler, seeds=list(range(prompt.shape[0])))
    return {e.key: (e.self_cpu_time_total / 1e3, e.count) for e in prof.key_averages() if e.key.startswith("aten::")}


def op_growth(model: DiffusionLM, sampler: SamplerConfig, prompt_len: int, vocab: int, batch: int,
              top: int) -> list[list[str]]:
    """The ``top`` ops by self CPU time at ``batch``: their time at batch 1 and ``batch`` (profiled, so
    inflated by the profiler's per-op cost) and the growth; the first row sums all aten ops."""
    g = torch.Generator().manual_seed(1)
    one, many = (self_times(model, torch.randint(0, vocab - 1, (b, prompt_len), generator=g), sampler)
                 for b in (1, batch))
    rows = [["all aten ops", f"{sum(c for _, c in one.values())}", f"{sum(t for t, _ in one.values()):.1f}",
             f"{sum(t for t, _ in many.values()):.1f}",
             f"{sum(t for t, _ in many.values()) / sum(t for t, _ in one.values()):.2f}"]]
    for name in sorted(many, key=lambda k: -many[k][0])[:top]:
        t1, n1 = one.get(name, (0.0, 0))
        rows.append([name, f"{n1}", f"{t1:.1f}", f"{many[name][0]:.1f}", f"{many[name][0] / t1:.2f}" if t1 else "-"])
    return rows


def speedup(rounds: dict[str, list[float]], label: str) -> str:
    """Median over rounds of (time of ``label (before)`` / time of ``label``), paired by round."""
    if f"{label} (before)" not in rounds:
        return "-"
    ratio, spread = paired_ratio(rounds, f"{label} (before)", label)
    return f"{ratio:.2f} ({spread:.0%})"


def main() -> None:
    args = parse_args()
    setup(args)
    print(environment_line(args))
    print(f"hidden {args.hidden}, ffn {3 * args.hidden}, heads {args.heads}/{args.kv_heads}, vocab {args.vocab}, "
          f"block {args.block}; prompt {args.prompt_len}, {args.new_tokens} new tokens, strategy topk; "
          f"{args.warmup} warm-up runs, median of {args.repeats} interleaved rounds, {args.clock} clock\n")
    models = models_of(args)
    g = torch.Generator().manual_seed(0)
    ref = next(iter(models))
    rates: dict[tuple[str, int], float] = {}
    for batch in args.batches:
        prompt = torch.randint(0, args.vocab - 1, (batch, args.prompt_len), generator=g)
        seeds = list(range(batch))
        nfe = {k: sample(m, prompt, s, seeds=seeds).row_nfe[0].tolist() for k, (m, s) in models.items()}
        runs = {k: partial(sample, m, prompt, s, seeds=seeds) for k, (m, s) in models.items()}
        rounds = interleaved_times(runs, args.warmup, args.repeats, CLOCKS[args.clock])
        timed = {k: median_spread(ts) for k, ts in rounds.items()}
        counts = {k: flops.sampling_flops_per_token(m.cfg, args.prompt_len, args.new_tokens, nfe[k])
                  for k, (m, _) in models.items()}
        rows = []
        for label, (model, _) in models.items():
            sec, spread = timed[label]
            tok_s = batch * args.new_tokens / sec
            rates[label, batch] = tok_s
            reference = REFERENCE_TOKENS_PER_S.get(model.cfg.variant)
            fl = counts[label].dense
            rows.append([
                label, f"{sum(nfe[label]) / len(nfe[label]):.1f}", f"{tok_s:.0f}", f"{spread:.0%}",
                f"{tok_s / reference:.2f}" if reference and batch == 1 else "-",
                f"{tok_s / rates[label, args.batches[0]]:.2f}",
                f"{timed[ref][0] / sec:.2f}", speedup(rounds, label), f"{fl / 1e6:.2f}", f"{tok_s * fl / 1e9:.2f}",
            ])
        headers = ["model", "NFE/block", "tokens/s", "p10-p90", "/ reference code",
                   f"/ batch {args.batches[0]}", "speed / E2D2", "/ before (p10-p90)", "MFLOP/token", "GFLOP/s"]
        print(f"batch {batch}")
        print(table(headers, rows))
        print()
    rows = []
    for label, (model, sampler) in models.items():
        if model.cfg.variant in ("e2d2", "bd3lm"):
            prompt = torch.randint(0, args.vocab - 1, (1, args.prompt_len), generator=g)
            ms, share, (low, high), n, ops_in, ops_out = step_overhead(model, prompt, sampler)
            rows.append([label, f"{n}", f"{ms:.2f}", f"{share:.1%}", f"{low:.1%}-{high:.1%}", f"{ops_in:.0f}",
                         f"{ops_out:.0f}"])
    print("per-step overhead at batch 1 (torch.profiler: sample.step vs the sample.forward inside it; "
          "median of 3 profiled runs after a profiled warm-up)")
    print(table(["model", "steps", "ms / step (profiled)", "outside the model", "range",
                 "aten ops / step in the forward", "outside it"], rows))
    if args.op_growth and max(args.batches) > 1:
        batch = max(args.batches)
        for label, (model, sampler) in models.items():
            if model.cfg.variant in ("e2d2", "bd3lm") and "before" not in label:
                print(f"\n{label}: self CPU ms of one run, batch 1 against batch {batch} ({batch}x the tokens)")
                print(table(["op", "calls at batch 1", "ms at batch 1", f"ms at batch {batch}", "growth"],
                            op_growth(model, sampler, args.prompt_len, args.vocab, batch, args.op_growth)))


if __name__ == "__main__":
    main()
