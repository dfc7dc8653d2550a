"""Activation memory per rank under context parallelism (``parallel.context_parallel``), on CPU.

One E2D2 forward and backward of one long sequence at CP1, CP2 and CP4 (``C`` gloo ranks,
TP1/PP1), through ``megatron_ext.training.train_step``. The measure is
``benchmarks.bench_engine_options.saved_bytes``: the distinct storages autograd saves in the
forward pass, i.e. the activation memory live when the backward pass starts, per rank.

Analytic model: everything a rank keeps scales with its ``L / C`` positions (its queries'
attention rows included: ``L / C x L``), except the all-gathered keys and values each layer
keeps for its backward pass, ``G = sum over layers of key streams x 2 x L x groups x
head_dim x 4 bytes`` (E2D2: one stream per encoder layer, two per decoder layer), which
stay whole: ``M(C) = M(1) / C + G (1 - 1 / C)``.

    .venv/bin/python -m benchmarks.bench_context_parallel            # about 1 minute
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import add_model_args, environment_line, model_config, table


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4])
    p.set_defaults(layers=3, dec_layers=1, vocab=512, hidden=128, heads=4, kv_heads=2)
    return p.parse_args()


def gathered_kv_bytes(cfg) -> int:
    """``G``: the whole-sequence keys and values every layer keeps (fp32)."""
    per_stream = 2 * cfg.seq_length * cfg.num_query_groups * cfg.kv_channels * 4
    return per_stream * (cfg.num_layers + 2 * cfg.num_decoder_layers)


def _rank(rank: int, cfg, cp: int) -> int:
    from benchmarks.bench_engine_options import saved_bytes
    from e2d2.config import DiffusionConfig
    from e2d2.diffusion import DiffusionObjective
    from megatron_ext.engine import build_engine
    from megatron_ext.groups import megatron_layout
    from megatron_ext.layout import ParallelConfig
    from megatron_ext.objective import make_forward_step, noised_batch
    from megatron_ext.training import train_step

    torch.set_num_threads(1)
    objective = DiffusionObjective(cfg, DiffusionConfig())
    x0 = torch.randint(0, cfg.vocab_size - 1, (1, cfg.seq_length),
                       generator=torch.Generator().manual_seed(0))
    batch = noised_batch(objective, x0, generator=torch.Generator().manual_seed(1))
    parallel = ParallelConfig(cp, context_parallel=cp)
    with megatron_layout(parallel):
        stages, chunks = build_engine(cfg, parallel)
        return saved_bytes(lambda: train_step(chunks, None, make_forward_step(objective), [batch],
                                              seq_length=stages[0].stream_length(),
                                              micro_batch_size=1))


def main() -> None:
    args = parse_args()
    from megatron_ext.testing import spawn_gloo

    cfg = model_config(args, "e2d2", args.layers, args.seq_len)
    measured = {cp: spawn_gloo(_rank, cp, cfg, cp) for cp in args.sizes}
    base, g = measured[1][0], gathered_kv_bytes(cfg)
    rows = []
    for cp, per_rank in measured.items():
        model = base / cp + g * (1 - 1 / cp)
        rows.append([str(cp), f"{max(per_rank) / 2**20:.1f}", f"{min(per_rank) / 2**20:.1f}",
                     f"{max(per_rank) / base:.3f}", f"{1 / cp:.3f}", f"{model / base:.3f}"])
    print(environment_line(args))
    print(f"E2D2 {cfg.num_layers}+{cfg.num_decoder_layers}, hidden {cfg.hidden_size}, heads "
          f"{cfg.num_attention_heads}/{cfg.num_query_groups}, vocab {cfg.vocab_size}, one "
          f"sequence L={cfg.seq_length}, S={cfg.block_size}, fp32; G = {g / 2**20:.1f} MiB\n")
    print(table(["CP", "max rank MiB", "min rank MiB", "max / CP1", "1/C",
                 "model M1/C + G(1-1/C)"], rows))


if __name__ == "__main__":
    main()
