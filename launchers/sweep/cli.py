"""``e2d2 sweep {submit,status,collect,bench}``: argument parsing only."""

from __future__ import annotations

import argparse
from pathlib import Path

from e2d2.errors import UserError


def _submit(args: argparse.Namespace) -> int:
    from launchers.sweep.spec import load_spec
    from launchers.sweep.submit import submit_local, submit_slurm

    spec = load_spec(args.spec)
    if args.jobs < 1 or (args.jobs > 1 and not args.local):
        raise UserError(f"--jobs {args.jobs}: give a number >= 1, with --local")
    messages = submit_local(spec, args.jobs) if args.local else submit_slurm(spec, args.dry_run)
    print("\n".join(messages))
    return 0


def _status(args: argparse.Namespace) -> int:
    from launchers.sweep.spec import load_spec
    from launchers.sweep.status import format_status, sweep_status

    print(format_status(sweep_status(load_spec(args.spec))))
    return 0


def _collect(args: argparse.Namespace) -> int:
    from launchers.sweep.collect import collect
    from launchers.sweep.spec import load_spec

    summary, failures = collect(load_spec(args.spec), draws=args.draws, metric=args.metric)
    print(summary)
    return 1 if failures else 0


def _bench(args: argparse.Namespace) -> int:
    from launchers.sweep.bench import RESULT_FILE, run_benchmark

    result = run_benchmark(Path(args.run_dir))
    print(f"sampling: {result['tokens_per_s']:.1f} tokens/s ({result['new_tokens']} new tokens "
          f"x {result['batch_size']}, {result['nfe']} denoiser calls, {result['device']}); "
          f"wrote {Path(args.run_dir) / RESULT_FILE}")
    return 0


def register(subparsers) -> None:
    sweep = subparsers.add_parser("sweep", help="scaling-law sweeps over decoder depth")
    sub = sweep.add_subparsers(dest="sweep_command", required=True)

    p = sub.add_parser("submit", help="submit the points that are not done (and a collect job)")
    p.add_argument("spec", help="sweep spec YAML (see configs/sweeps/)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--local", action="store_true", help="run the points here, in turn")
    mode.add_argument("--dry-run", action="store_true", help="print the scripts, submit nothing")
    p.add_argument("--jobs", type=int, default=1,
                   help="with --local: runs at a time (default 1; each uses the spec's ranks)")
    p.set_defaults(func=_submit)

    p = sub.add_parser("status", help="pending / running / done / stale / failed, per run")
    p.add_argument("spec")
    p.set_defaults(func=_status)

    p = sub.add_parser("collect", help="eval metrics, tables, power-law fits, Pareto frontiers, plots")
    p.add_argument("spec")
    p.add_argument("--draws", type=int, default=1000, help="bootstrap resamples per fit")
    p.add_argument("--metric", default="valid_nelbo",
                   help="the response of the fits, comparisons and figures: valid_nelbo "
                        "(default) or a metric of the spec's eval section (<corpus>_nelbo, "
                        "<task>_<metric>; an accuracy as its error 1 - acc)")
    p.set_defaults(func=_collect)

    p = sub.add_parser("bench", help="the fixed sampling benchmark of one finished run")
    p.add_argument("run_dir")
    p.set_defaults(func=_bench)
