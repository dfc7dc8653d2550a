"""The pretraining engine's cost on this CPU: overhead over the reference trainer, and the four
variants through ``e2d2 pretrain`` beside their analytic FLOPs ratios.

1. Engine overhead: one training step (forward, backward, clipped Adam update) of the
   megatron-core engine at TP1/PP1 (DDP, megatron's optimizer and schedule, vocab-parallel
   loss, NaN guard) against the single-process reference trainer's step (``e2d2.train``:
   the reference model, torch AdamW), same model, same noised batch, timed interleaved.
   Goal: engine / reference <= 1.10.
2. ``e2d2 pretrain`` on each variant at equal total depth (E2D2 N - N_dec + N_dec, BD3-LM N,
   MDLM N, AR N), one process each, run in turn: median tokens/s over the steps after
   warm-up, and the ratio to E2D2 beside the analytic training-FLOPs ratio (``e2d2.flops``,
   dense attention: what CPU SDPA with a boolean mask computes).

    .venv/bin/python -m benchmarks.bench_pretrain               # about 4 minutes
    .venv/bin/python -m benchmarks.bench_pretrain --skip-variants
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from benchmarks.common import (
    add_model_args,
    e2d2_training_inputs,
    environment_line,
    interleaved_medians,
    kjv_bytes_dataset,
    model_config,
    pretrain_tokens_per_s,
    setup,
    table,
)
from e2d2 import flops
from e2d2.diffusion import NoisedBatch, per_sequence_loss, token_nll
from e2d2.model import DiffusionLM


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--variant-steps", type=int, default=30, help="steps per e2d2 pretrain run")
    p.add_argument("--skip-variants", action="store_true")
    return p.parse_args()


def engine_overhead(args: argparse.Namespace) -> str:
    from launchers.world import init_world, world_of_one
    from megatron_ext import cpu_compat
    from megatron_ext.engine import build_engine
    from megatron_ext.groups import megatron_layout
    from megatron_ext.layout import ParallelConfig
    from megatron_ext.objective import make_forward_step
    from megatron_ext.training import build_training_optimizer, train_step

    cfg, train, objective, x0, batch = e2d2_training_inputs(args)
    nb = NoisedBatch(**{k: batch[k] for k in NoisedBatch.__dataclass_fields__})

    reference = DiffusionLM(cfg, seed=0)  # the engine's weights too (build_engine's seed)
    adamw = torch.optim.AdamW(reference.parameters(), lr=train.lr, betas=train.betas,
                              weight_decay=train.weight_decay)

    def reference_step():
        adamw.zero_grad(set_to_none=True)
        logits = reference(x0, nb.xt)
        per_sequence_loss(token_nll(logits, x0, cfg.mask_token_id), nb, "none").mean().backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), train.grad_clip)
        adamw.step()

    cpu_compat.install()
    init_world(world_of_one("local"))
    parallel = ParallelConfig(1)
    with megatron_layout(parallel):
        stages, chunks = build_engine(cfg, parallel)
        optimizer, _ = build_training_optimizer(chunks, parallel, train)
        forward = make_forward_step(objective)

        def engine_step():
            train_step(chunks, optimizer, forward, [batch],
                       seq_length=stages[0].stream_length(), micro_batch_size=args.batch)

        times = interleaved_medians({"reference trainer": reference_step,
                                     "engine (TP1/PP1)": engine_step}, args.warmup, args.repeats)
    torch.distributed.destroy_process_group()
    ref = times["reference trainer"][0]
    rows = [[name, f"{t * 1e3:.1f}", f"{spread:.0%}", f"{t / ref:.3f}"]
            for name, (t, spread) in times.items()]
    return (f"E2D2 {cfg.num_layers}+{cfg.num_decoder_layers}, hidden {cfg.hidden_size}, vocab "
            f"{cfg.vocab_size}, L={cfg.seq_length}, batch {args.batch}\n"
            + table(["step", "median ms", "p10-p90 spread", "/ reference"], rows))


def variants_through_pretrain(args: argparse.Namespace) -> str:
    n = args.layers
    rows_of = {f"E2D2 {n - args.dec_layers}+{args.dec_layers}": "e2d2", f"BD3-LM {n}": "bd3lm",
               f"MDLM {n}": "mdlm", f"AR {n}": "ar"}
    # The bytes tokenizer (260 ids, [MASK] = 259) of the embedded corpus.
    vocab_args = argparse.Namespace(**{**vars(args), "vocab": 260})
    measured, analytic = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = kjv_bytes_dataset(root)
        for label, variant in rows_of.items():
            cfg = model_config(vocab_args, variant, n, args.seq_len)
            speeds = pretrain_tokens_per_s(cfg, data, root / variant, args.variant_steps, args.batch)
            measured[label] = statistics.median(speeds[5:])
            analytic[label] = flops.training_flops_per_token(cfg).dense
    base = next(iter(rows_of))
    rows = [[label, f"{measured[label]:,.0f}", f"{measured[base] / measured[label]:.2f}",
             f"{analytic[label] / analytic[base]:.2f}"] for label in rows_of]
    return (f"e2d2 pretrain, one process, hidden {args.hidden}, L={args.seq_len}, batch "
            f"{args.batch}, {args.variant_steps} steps (median after 5)\n"
            + table(["variant", "tokens/s", "time / E2D2's", "FLOPs / E2D2's (dense)"], rows))


def main() -> None:
    args = parse_args()
    setup(args)
    print(environment_line(args))
    print(engine_overhead(args))
    if not args.skip_variants:
        print(variants_through_pretrain(args))


if __name__ == "__main__":
    main()
