"""``e2d2 profile CONFIG [section.key=value ...]``: where one model's FLOPs and time go, per module.

Runs ``--warmup`` then ``--steps`` training steps (forward, cross-entropy against ``x0``,
backward; no optimizer) of one model on this process, on random tokens (a micro-batch of
``train.micro_batch_size`` sequences of ``model.seq_length``, half the noisy tokens masked):

* ``--model reference`` (default): the reference model (``e2d2.model.DiffusionLM``);
* ``--model engine``: the megatron-core stage (``megatron_ext.model.ParallelDiffusionLM``)
  at TP1 on one process, by default the whole model as one stage; ``--stage K`` builds
  stage K of the config's pipeline plan instead (a later stage gets a random incoming
  tensor and a random output gradient).

It prints one row per module down to ``--depth`` (3: a layer's attention, MLP and norms):
parameters; forward FLOPs per step counted by DeepSpeed's FLOPs profiler
(``deepspeed.profiling.flops_profiler``, the optional extra ``e2d2[profile]``) beside
``e2d2.flops``'s analytic count (``module_costs``, dense attention), flagged ``!`` where
they differ by more than 2%; forward time (DeepSpeed's module hooks); backward FLOPs (2x
forward, the convention of both DeepSpeed and ``e2d2.flops``) and backward time (from the
gradient reaching the module's output to its input's gradient being complete). Attention
runs through SDPA with a dense mask here, also on CUDA (``e2d2.attention.sdpa_only``):
DeepSpeed counts SDPA, not FlexAttention. The reference model's LM head is a ``F.linear`` in
``DiffusionLM.logits``, not a module: its row is the FLOPs DeepSpeed counts at the top level.
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("profile", help="per-module FLOPs and time of one model (DeepSpeed)",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML run config (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides, e.g. model.seq_length=512 train.micro_batch_size=2")
    p.add_argument("--model", choices=("reference", "engine"), default="reference")
    p.add_argument("--stage", type=int, default=None,
                   help="engine only: profile this (virtual) pipeline stage of the config's plan")
    p.add_argument("--steps", type=int, default=2, help="profiled steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--depth", type=int, default=3, help="module name depth of the rows")
    p.set_defaults(func=_command)


def _command(args: argparse.Namespace) -> int:
    from launchers.config import load_run_config

    cfg = load_run_config(args.config, args.overrides)
    from launchers.profiler import profile  # torch and DeepSpeed, once the config is valid

    report = profile(cfg, args.model, args.stage, args.steps, args.warmup, args.depth)
    print(report.format())
    return 0
