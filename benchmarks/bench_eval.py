"""Evaluation speed: ``e2d2 eval``'s tokens/s against the training forward's, and the time per
lm-eval ``loglikelihood`` request at 1, 8 and 32 Monte-Carlo draws.

    PYTHONPATH=. python benchmarks/bench_eval.py [--hidden 256 --layers 6 ...] [--seq 128]

* ``e2d2 eval``: `launchers.eval.nelbo.engine_nats` (per-row noising, the megatron engine's
  ``forward_only``, the ELBO weighting) on ``--rows`` rows of ``--seq`` tokens, one process
  (a gloo world of one), against megatron's forward-only schedule on the same rows with
  training noise noised once in a batch (the training step's forward, without its backward):
  the ratio is evaluation's overhead (per-row generators, bookkeeping).
* lm-eval: `e2d2.likelihood.score_rows` (what ``E2D2Harness.loglikelihood`` runs per batch),
  ``--requests`` requests of a 24-token context and an 8-token continuation in batches of 8;
  seconds per request. E2D2 and the AR baseline (exact: draws do not apply).

Random weights (speed does not depend on them); times are wall seconds, interleaved, medians.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    add_model_args,
    environment_line,
    interleaved_medians,
    model_config,
    setup,
    table,
)
from e2d2.config import DiffusionConfig  # noqa: E402
from e2d2.diffusion import DiffusionObjective  # noqa: E402
from e2d2.likelihood import request_generator, score_rows  # noqa: E402
from e2d2.model import DiffusionLM  # noqa: E402


def _engine_rates(args, cfg) -> tuple[float, float]:
    """(eval tokens/s, training-forward tokens/s) through the megatron engine."""
    from launchers.eval.data import EvalRows
    from launchers.eval.nelbo import engine_nats
    from megatron_ext import cpu_compat
    from megatron_ext.engine import build_engine
    from megatron_ext.groups import megatron_layout
    from megatron_ext.layout import ParallelConfig
    from megatron_ext.objective import make_forward_step, micro_batches, noised_batch
    from megatron_ext.training import forward_only

    cpu_compat.install()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0,
                                         world_size=1)
    objective = DiffusionObjective(cfg, DiffusionConfig())
    x0 = torch.randint(0, cfg.mask_token_id, (args.rows, cfg.seq_length),
                       generator=torch.Generator().manual_seed(0))
    ones = torch.ones_like(x0, dtype=torch.bool)
    rows = EvalRows(x0, ones, torch.zeros_like(ones))
    try:
        with megatron_layout(ParallelConfig(1)):
            stages, chunks = build_engine(cfg, ParallelConfig(1))
            length = stages[0].stream_length()
            train_batches = micro_batches(noised_batch(objective, x0, generator=torch.Generator()),
                                          args.micro_batch)
            train_forward = make_forward_step(objective)
            times = interleaved_medians({
                "eval": lambda: engine_nats(chunks, objective, rows, 1, 0, args.micro_batch, length),
                "train_forward": lambda: forward_only(chunks, train_forward, train_batches,
                                                      seq_length=length,
                                                      micro_batch_size=args.micro_batch),
            }, warmup=1, repeats=args.repeats)
    finally:
        torch.distributed.destroy_process_group()
    tokens = args.rows * cfg.seq_length
    return tokens / times["eval"][0], tokens / times["train_forward"][0]


def _request_times(args, variant: str) -> dict[int, float]:
    """Seconds per loglikelihood request at each draw count."""
    cfg = model_config(args, variant, args.layers, args.seq)
    model = DiffusionLM(cfg, seed=0).eval()
    objective = DiffusionObjective(cfg, DiffusionConfig())
    batch, width = 8, 32
    x0 = torch.randint(0, cfg.mask_token_id, (batch, width), generator=torch.Generator().manual_seed(1))
    real = torch.ones_like(x0, dtype=torch.bool)
    context = torch.arange(width)[None].expand(batch, width) < 25  # [EOD] + 24 context tokens
    draws = (1,) if variant == "ar" else (1, 8, 32)

    def score(n):
        return lambda: score_rows(model, objective, x0, context, real, n,
                                  [request_generator("bench", i) for i in range(batch)])

    times = interleaved_medians({n: score(n) for n in draws}, warmup=1, repeats=args.repeats)
    return {n: times[n][0] / batch for n in draws}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    setup(args)
    print(environment_line(args))
    cfg = model_config(args, "e2d2", args.layers, args.seq)
    eval_rate, train_rate = _engine_rates(args, cfg)
    print(table(["e2d2 (engine, 1 process)", "tokens/s"],
                [["e2d2 eval (1 draw)", f"{eval_rate:,.0f}"],
                 ["training forward", f"{train_rate:,.0f}"],
                 ["ratio eval / training forward", f"{eval_rate / train_rate:.2f}"]]))
    rows = []
    for variant in ("e2d2", "ar"):
        for n, seconds in _request_times(args, variant).items():
            rows.append([variant, str(n) if variant != "ar" else "exact", f"{seconds * 1e3:.1f}"])
    print(table(["lm-eval loglikelihood", "draws", "ms / request"], rows))


if __name__ == "__main__":
    main()
