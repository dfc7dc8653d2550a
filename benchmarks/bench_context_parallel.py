"""Activation memory per rank under context parallelism (``parallel.context_parallel``), on CPU.

One E2D2 forward and backward of one long sequence at CP1, CP2 and CP4 (``C`` gloo ranks,
TP1/PP1), through ``megatron_ext.training.train_step``. The measure is
``benchmarks.bench_engine_options.saved_bytes``: the distinct storages autograd saves in the
forward pass, i.e. the activation memory live when the backward pass starts, per rank.

Analytic model: everything a rank keeps scales with its ``L / C`` positions (its queries'
attention rows included: ``L / C x L``), except the all-gathered keys and values each layer
keeps for its backward pass, ``G = sum over layers of key streams x 2 x L x groups x
head_dim x 4 bytes`` (E2D2: one stream per encoder layer, two per decoder layer), which
stay whole: ``M(C) = M(1) / C + G (1 - 1 / C)``. ``M(1)`` itself is predicted too
(``activation_bytes``, what each op of the layer keeps, counted by hand) and compared with
the measurement.

``--predict CONFIG`` prints the same model's memory per GPU for a run config (weights,
fp32 gradients, optimizer state and the activations of the micro-batches in flight):
the long-context config's prediction.

    .venv/bin/python -m benchmarks.bench_context_parallel            # about 1 minute
    .venv/bin/python -m benchmarks.bench_context_parallel --predict configs/h100-1b-e2d2-8k.yaml
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
    p.add_argument("--predict", metavar="CONFIG", help="only print the predicted memory per "
                   "GPU of this run config")
    p.set_defaults(layers=3, dec_layers=1, vocab=512, hidden=128, heads=4, kv_heads=2)
    return p.parse_args()


def gathered_kv_bytes(cfg) -> int:
    """``G``: the whole-sequence keys and values every layer keeps (fp32)."""
    per_stream = 2 * cfg.seq_length * cfg.num_query_groups * cfg.kv_channels * 4
    return per_stream * (cfg.num_layers + 2 * cfg.num_decoder_layers)


def activation_bytes(cfg, *, tp: int = 1, cp: int = 1, dtype_bytes: int = 4,
                     dense_mask: bool = True, recompute: str = "none",
                     sequence_parallel: bool = False) -> int:
    """Predicted bytes autograd keeps for the backward pass of one sequence on one rank.

    Per position and layer (elements, TP-sharded where the engine shards): the two RMSNorm
    inputs and the two normed inputs of the fused linears (``4 hidden``), q for attention
    and the attention output twice (its own and ``o_proj``'s reshaped input: ``3 heads x
    head_dim``), the attention's log-sum-exp (``heads``, fp32), QK-norm inputs, the SwiGLU's
    fused input, ``silu(gate)`` and ``down_proj``'s input (``4 ffn``); an E2D2 decoder layer
    also normalises ``h_enc`` (``2 hidden``). Keys and values: ``G`` (whole sequence).
    CPU SDPA with a boolean mask also keeps it as an fp32 additive mask per layer
    (``dense_mask``: ``keys`` fp32 per query). The head keeps the final norm's input and
    output and the fp32 logits (``vocab / TP``, megatron's cross-entropy works in place).
    ``recompute="full"`` keeps only each layer's input. With sequence parallelism the
    ``hidden`` terms are this TP rank's ``1 / TP`` of the positions. Not counted: the embedding lookup's
    indices, RMSNorm's per-position statistics."""
    d, L = cfg.kv_channels, cfg.seq_length
    h = cfg.hidden_size // tp if sequence_parallel else cfg.hidden_size
    heads, groups, ffn = cfg.num_attention_heads // tp, cfg.num_query_groups // tp, cfg.ffn_hidden_size // tp
    local = L // cp
    qk_norm = (heads + groups) * d if cfg.qk_layernorm else 0
    enc_layers, dec_layers = cfg.num_layers, cfg.num_decoder_layers
    key_streams = enc_layers + 2 * dec_layers  # K/V streams over all layers
    if recompute == "full":
        per_position = (enc_layers + 2 * dec_layers) * h
        return local * per_position * dtype_bytes + _head_bytes(cfg, tp, local, dtype_bytes)
    layer = 4 * h + 3 * heads * d + qk_norm + 4 * ffn
    kept = local * (enc_layers * layer + dec_layers * (layer + 2 * h)) * dtype_bytes
    kept += local * (enc_layers + dec_layers) * heads * 4  # log-sum-exp, fp32
    kept += key_streams * 2 * L * groups * d * dtype_bytes  # G: gathered K/V
    if dense_mask:
        kept += local * (enc_layers * L + dec_layers * 2 * L) * 4
    return kept + _head_bytes(cfg, tp, local, dtype_bytes)


def _head_bytes(cfg, tp: int, positions: int, dtype_bytes: int) -> int:
    return positions * (2 * cfg.hidden_size * dtype_bytes + cfg.vocab_size // tp * 4)


def parameter_count(cfg) -> int:
    """Reference-model parameters (tied head counted once)."""
    h, d = cfg.hidden_size, cfg.kv_channels
    attn = h * (cfg.num_attention_heads + 2 * cfg.num_query_groups) * d + cfg.num_attention_heads * d * h
    layer = attn + 3 * h * cfg.ffn_hidden_size + 2 * h + (2 * d if cfg.qk_layernorm else 0)
    head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * h
    return (cfg.num_layers + cfg.num_decoder_layers) * layer + cfg.vocab_size * h + head + 2 * h


def predicted_memory(path: str) -> str:
    """The memory per GPU of the run config at ``path``, as text (PP1: one stage holds the
    model; weights bf16 with fp32 gradients, Adam's fp32 main weights and moments sharded
    over DP x CP by the distributed optimizer)."""
    from launchers.config import load_run_config

    run = load_run_config(path)
    cfg, par, train = run.model, run.parallel, run.train
    if par.pipeline_parallel != 1:
        raise SystemExit("--predict models PP1 configs only")
    tp, cp = par.tensor_parallel, par.context_parallel
    wbytes = 4 if train.precision == "fp32" else 2
    params = parameter_count(cfg) / tp  # embedding and layers split over TP (norms: negligible)
    optimizer = 12 * params / (cp if par.use_distributed_optimizer else 1)  # per DP=1; / DP more
    activations = train.micro_batch_size * activation_bytes(
        cfg, tp=tp, cp=cp, dtype_bytes=wbytes, dense_mask=False, recompute=par.recompute,
        sequence_parallel=par.sequence_parallel)
    gib = 2**30
    parts = {"weights": wbytes * params, "fp32 gradients": 4 * params,
             "optimizer (DP=1)": optimizer, "activations": activations}
    text = ", ".join(f"{k} {v / gib:.1f}" for k, v in parts.items())
    return (f"{path}: {parameter_count(cfg) / 1e9:.2f} B parameters, TP{tp} x CP{cp}, L="
            f"{cfg.seq_length}, micro-batch {train.micro_batch_size}: {text}; total "
            f"{sum(parts.values()) / gib:.1f} GiB per GPU (less optimizer state with DP > 1)")


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
    if args.predict:
        print(predicted_memory(args.predict))
        return
    from megatron_ext.testing import spawn_gloo

    cfg = model_config(args, "e2d2", args.layers, args.seq_len)
    measured = {cp: spawn_gloo(_rank, cp, cfg, cp) for cp in args.sizes}
    base, g = measured[1][0], gathered_kv_bytes(cfg)
    rows = []
    for cp, per_rank in measured.items():
        model = base / cp + g * (1 - 1 / cp)
        rows.append([str(cp), f"{max(per_rank) / 2**20:.1f}", f"{min(per_rank) / 2**20:.1f}",
                     f"{activation_bytes(cfg, cp=cp) / 2**20:.1f}",
                     f"{max(per_rank) / base:.3f}", f"{1 / cp:.3f}", f"{model / base:.3f}"])
    print(environment_line(args))
    print(f"E2D2 {cfg.num_layers}+{cfg.num_decoder_layers}, hidden {cfg.hidden_size}, heads "
          f"{cfg.num_attention_heads}/{cfg.num_query_groups}, vocab {cfg.vocab_size}, one "
          f"sequence L={cfg.seq_length}, S={cfg.block_size}, fp32; G = {g / 2**20:.1f} MiB\n")
    print(table(["CP", "max rank MiB", "min rank MiB", "predicted MiB", "max / CP1", "1/C",
                 "model M1/C + G(1-1/C)"], rows))


if __name__ == "__main__":
    main()
