"""``e2d2 lm-eval``: registered cheaply; the handler imports lm-eval. (``e2d2 eval`` registers
in ``launchers.eval.nelbo``.)"""

from __future__ import annotations

import argparse


def register_lm_eval(subparsers) -> None:
    p = subparsers.add_parser(
        "lm-eval", add_help=False, prefix_chars="\0",
        help="lm-evaluation-harness with the model registered as `e2d2` (pip install '.[eval]')",
        description="Runs lm-eval's own command line: every lm-eval flag works. "
                    "--model_args pretrained=RUN_OR_CHECKPOINT_OR_EXPORT,mc_draws=N,... "
                    "See docs/eval.md.")
    p.add_argument("lm_eval_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=_lm_eval)


def _lm_eval(args: argparse.Namespace) -> int:
    from launchers.eval.harness import run_lm_eval

    return run_lm_eval(args.lm_eval_args)
