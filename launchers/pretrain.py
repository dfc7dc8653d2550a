"""``e2d2 pretrain``: the command line of a training run (the run itself: `launchers.trainer`).

    e2d2 pretrain CONFIG.yaml [section.key=value ...] [--resume auto|none|PATH]
    torchrun --standalone --nproc-per-node N $(which e2d2) pretrain CONFIG.yaml ...
    e2d2 pretrain --nproc-per-node N CONFIG.yaml ...

Exit codes: 0 done (or already done: nothing written); 2 bad input (one message);
``PREEMPTED_EXIT_CODE`` (75) after SIGTERM or SIGUSR1 and ``INTERRUPTED_EXIT_CODE`` (130) after
Ctrl-C: the step in flight finished and a checkpoint was saved (during the start-up: nothing
was written), requeue the job or run the command again; 1 anything else, such as
``train.max_consecutive_skips`` non-finite steps in a row.

This module imports neither torch nor megatron-core: ``--help`` and config errors answer at
once, and the trainer is imported once the config is valid.
"""

from __future__ import annotations

import argparse
import sys

from launchers.config import load_run_config


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "pretrain", help="pretrain on the megatron-core engine (any TP/PP/DP layout)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML run config (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides, e.g. run.dir=runs/x train.steps=100 data.path=DIR")
    p.add_argument("--resume", default="auto",
                   help="auto: continue from checkpoints/latest if any (default); none: start "
                        "fresh (refused if run.dir already has checkpoints); PATH: a checkpoint "
                        "or run directory to continue from")
    p.add_argument("--nproc-per-node", type=int, default=None,
                   help="start this many local ranks (gloo on CPU, NCCL on GPUs)")
    p.set_defaults(func=_command)


def _command(args: argparse.Namespace) -> int:
    cfg = load_run_config(args.config, args.overrides)  # fail here, before ranks start
    from launchers.trainer import (
        TrainingAborted,
        checked_inputs,
        finished_at,
        micro_batch_size,
        pretrain,
    )

    if args.nproc_per_node:
        from launchers.local_launch import launch_local

        # Every check that needs no rank fails here, once; the ranks repeat them (cheaply).
        candidates, _, _ = checked_inputs(cfg, args.resume)
        micro_batch_size(cfg, cfg.parallel.engine(args.nproc_per_node, cfg.train.precision, cfg.model))
        if finished_at(cfg, args.resume, candidates) is not None:
            return 0
        argv = ["pretrain", args.config, *args.overrides, "--resume", args.resume]
        return launch_local(args.nproc_per_node, argv)
    try:
        return pretrain(cfg, args.resume)
    except TrainingAborted as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
