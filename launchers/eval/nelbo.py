"""``e2d2 eval``: zero-shot NELBO of a checkpoint on held-out data, through the megatron engine.

    e2d2 eval RUN_OR_CHECKPOINT [section.key=value ...] --data PATH [PATH ...] [--draws N]
              [--convention packed|document] [--split valid|train] [--ema] [--json]
    e2d2 eval --nproc-per-node N RUN ... (or torchrun / srun: any TP/PP/DP layout)

The checkpoint (any layout) is loaded into this world's layout (the run's ``parallel``
section, overridable: ``parallel.tensor_parallel=2``), and every row is noised with its own
generator, keyed by the run seed, the draw and the row's index (as ``e2d2 pretrain``'s
evaluation does), so every layout gives the same number. Rows are spread over the
data-parallel ranks; the per-row results are summed over the world.

Reported (``--json`` prints one object; the record is appended to ``RUN/eval.jsonl``):
``nelbo`` (nats per counted token: total nats over total tokens; AR: exact NLL), ``ppl``
(``exp(nelbo)``, an upper bound on perplexity), ``nelbo_std_error`` (between sequences: what
another sample of the data would change), ``nelbo_mc_std_error`` (Monte-Carlo over the
draws, for these sequences; 0 for AR, NaN with one draw), ``tokens``, ``sequences``.
See docs/eval.md for the two conventions.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from e2d2.errors import UserError

if TYPE_CHECKING:  # torch comes with the engine, after the arguments are checked
    import torch

_OVERRIDE = re.compile(r"^[a-z_]+\.[a-z_.]+=")


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="zero-shot NELBO / perplexity bound on held-out data",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a run directory (its latest checkpoint) or an iter_* directory")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="run-config overrides for this evaluation (parallel.*, train.precision, "
                        "train.micro_batch_size); the model cannot change")
    p.add_argument("--data", nargs="+", required=True, metavar="PATH",
                   help="preprocessed directories or .jsonl/.json/.txt/.parquet files (compressed too)")
    p.add_argument("--split", choices=("valid", "train"), default="valid",
                   help="the split of a preprocessed directory (default valid)")
    p.add_argument("--convention", choices=("packed", "document"), default="packed",
                   help="packed windows (default; a run's own evaluation) or one document per "
                        "row, BOS first, chunked to seq_length (MDLM's zero-shot)")
    p.add_argument("--draws", type=int, default=None,
                   help="Monte-Carlo time draws per sequence (default train.eval_draws; AR: exact)")
    p.add_argument("--max-sequences", type=int, default=None, help="evaluate only the first N rows")
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--nproc-per-node", type=int, default=None,
                   help="start this many local ranks (gloo on CPU, NCCL on GPUs)")
    p.set_defaults(func=_command)


def _command(args: argparse.Namespace) -> int:
    # Overrides typed after --data land in it: move them back.
    args.overrides += [d for d in args.data if _OVERRIDE.match(d)]
    args.data = [d for d in args.data if not _OVERRIDE.match(d)]
    if not args.data:
        raise UserError("--data needs at least one PATH")
    if (args.draws is not None and args.draws < 1) or (args.max_sequences is not None
                                                       and args.max_sequences < 1):
        raise UserError("--draws and --max-sequences must be >= 1")
    setup = _setup(args)  # bad input fails here, before ranks start
    if args.nproc_per_node:
        from launchers.local_launch import launch_local

        argv = ["eval", args.checkpoint, *args.overrides, "--data", *args.data, "--split",
                args.split, "--convention", args.convention]
        for flag, value in (("--draws", args.draws), ("--max-sequences", args.max_sequences)):
            if value is not None:
                argv += [flag, str(value)]
        argv += ["--ema"] * args.ema + ["--json"] * args.json
        return launch_local(args.nproc_per_node, argv)
    return evaluate(args, *setup)


def _setup(args):
    from launchers.checkpoint_dirs import locate
    from launchers.config import identity_differences, load_run_config
    from launchers.inputs import check_vocabulary
    from launchers.sample import run_tokenizer

    found = locate(args.checkpoint)
    cfg = load_run_config(found.config_path, args.overrides)
    diffs = identity_differences(found.config, cfg)
    if diffs:
        raise UserError(f"overrides change the model ({'; '.join(diffs)}); an evaluation reads "
                        "the checkpoint's model as it is")
    tokenizer = run_tokenizer(cfg, found.directory)
    check_vocabulary(tokenizer, cfg.model, str(found.directory))
    return found, cfg, tokenizer


def evaluate(args, found, cfg, tokenizer) -> int:
    """This rank's part of ``e2d2 eval`` (collective)."""
    import torch

    from launchers.world import init_world
    from megatron_ext import cpu_compat
    from megatron_ext.training import enable_tf32

    cpu_compat.install()
    enable_tf32()
    init_world()
    try:
        record = _evaluate(args, found, cfg, tokenizer)
    finally:
        torch.distributed.destroy_process_group()
    if record is not None:
        _report(record, found, args.json)
    return 0


def _evaluate(args, found, cfg, tokenizer) -> dict | None:
    import torch

    from e2d2.diffusion import DiffusionObjective
    from e2d2.evaluate import token_weighted_nelbo
    from launchers.eval.data import eval_rows
    from megatron_ext import checkpoint as engine_checkpoint
    from megatron_ext.engine import build_engine
    from megatron_ext.groups import megatron_layout
    from megatron_ext.layout import PipelinePlan

    rank = torch.distributed.get_rank()
    parallel = cfg.parallel.engine(torch.distributed.get_world_size(), cfg.train.precision,
                                   cfg.model)
    plan = PipelinePlan(cfg.model, parallel)
    objective = DiffusionObjective(cfg.model, cfg.diffusion)
    exact = cfg.model.plan.autoregressive
    draws = 1 if exact else (args.draws or cfg.train.eval_draws)
    prefix = engine_checkpoint.EMA_PREFIX if args.ema else engine_checkpoint.MODEL_PREFIX
    cache = (found.run_dir or found.directory.parent) / "cache"
    rows = eval_rows(args.data, tokenizer, seq_length=cfg.model.seq_length,
                     block_size=cfg.model.diffusion_block_size, convention=args.convention,
                     split=args.split, seed=cfg.run.seed, cache_dir=cache).head(args.max_sequences)
    with megatron_layout(parallel, seed=cfg.run.seed, get_embedding_ranks=plan.get_embedding_ranks):
        stages, chunks = build_engine(cfg.model, parallel, trained=(found.directory, prefix))
        micro = cfg.train.micro_batch_size or max(1, cfg.train.batch_size // parallel.data_parallel)
        nats = engine_nats(chunks, objective, rows, draws, cfg.run.seed, micro,
                           stages[0].stream_length(), progress=rank == 0 and sys.stderr.isatty())
    tokens = objective.loss_mask(rows.x0, rows.attention_mask, rows.context_mask).sum(-1)
    if rank != 0:
        return None
    result = token_weighted_nelbo(nats, tokens, exact=exact)
    counted = int(tokens.sum())
    step = engine_checkpoint.read_common(found.directory).get("state", {}).get("step")
    return {"nelbo": result.nelbo, "ppl": result.perplexity,
            "nelbo_std_error": result.sequence_std_error, "nelbo_mc_std_error": result.std_error,
            "tokens": counted, "sequences": result.sequences, "draws": draws,
            "convention": args.convention, "split": args.split,
            "data": [str(Path(p).resolve()) for p in args.data],
            "checkpoint": str(found.directory.resolve()), "step": step, "ema": args.ema,
            "layout": parallel.name, "time": datetime.datetime.now(datetime.UTC).isoformat()}


def engine_nats(chunks, objective, rows, draws: int, seed: int, micro_batch: int,
                seq_length: int, progress: bool = False) -> torch.Tensor:
    """``[n, draws]`` NELBO of every row in nats (AR: exact NLL), on every rank: each
    data-parallel rank runs micro-batches of ``micro_batch`` rows through megatron's schedule
    (``forward_only``); row ``i`` of draw ``d`` is noised as ``e2d2 pretrain`` noises its
    validation sample ``i`` (`megatron_ext.objective.noised_samples`)."""
    import torch
    from megatron.core import parallel_state
    from tqdm.auto import tqdm

    from megatron_ext.groups import collective_device
    from megatron_ext.objective import make_forward_step, noised_samples
    from megatron_ext.training import forward_only, last_stage_sum

    n = len(rows)
    dp, dp_rank = (parallel_state.get_data_parallel_world_size(),
                   parallel_state.get_data_parallel_rank())
    per_round = micro_batch * dp
    forward = make_forward_step(objective, evaluation=True)
    tokens = objective.loss_mask(rows.x0, rows.attention_mask, rows.context_mask).sum(-1)
    local = torch.zeros(n, draws, dtype=torch.float64)
    rounds = math.ceil(n / per_round)
    for chunk in chunks:
        chunk.eval()
    bar = tqdm(total=draws * rounds, desc="eval", unit="batch", disable=not progress,
               dynamic_ncols=True)
    for d in range(draws):
        # One micro-batch per round: rows past the end repeat row 0 and are dropped.
        batches, ids = [], []
        for r in range(rounds):
            first = r * per_round + dp_rank * micro_batch
            mine = [i if i < n else -1 for i in range(first, first + micro_batch)]
            idx = [max(i, 0) for i in mine]
            batches.append(noised_samples(objective, rows.x0[idx], idx, seed, train=False, draw=d,
                                          attention_mask=rows.attention_mask[idx],
                                          context_mask=rows.context_mask[idx]))
            ids.append(mine)
        outputs = forward_only(chunks, forward, batches, seq_length=seq_length,
                               micro_batch_size=micro_batch)
        bar.update(rounds)
        for mine, out in zip(ids, outputs, strict=False):  # outputs only on the last stage
            for i, value in zip(mine, out["per_sequence"].double().cpu().tolist(), strict=True):
                if i >= 0:
                    local[i, d] = value * max(int(tokens[i]), 1)
    bar.close()
    return last_stage_sum(local.to(collective_device())).cpu()


def _report(record: dict, found, as_json: bool) -> None:
    run_dir = found.run_dir or found.directory
    line = json.dumps(record) + "\n"
    path = run_dir / "eval.jsonl"
    # One write of one line, synced: a reader never sees half a record.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    if as_json:
        print(json.dumps(record))
    else:
        print(f"NELBO {record['nelbo']:.4f} ± {record['nelbo_std_error']:.4f} (between sequences) "
              f"± {record['nelbo_mc_std_error']:.4f} (Monte-Carlo, {record['draws']} draws) "
              f"nats/token, perplexity <= {record['ppl']:.2f}; {record['tokens']} tokens in "
              f"{record['sequences']} sequences ({record['convention']}); appended to {path}")
