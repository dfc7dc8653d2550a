"""The ``e2d2`` command line.

Each subsystem owns its subcommands and registers them through a ``register(subparsers)``
function named in ``COMMANDS``, so this file stays a thin router. Only the module of the
command being run is imported: ``e2d2 --help``, ``e2d2 submit --dry-run`` and config errors
do not wait for torch and megatron-core.

Options and ``section.key=value`` overrides may come in any order
(``e2d2 pretrain CONFIG --nproc-per-node 2 run.dir=x``), as with torchrun and Hydra.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
import warnings

from e2d2.errors import ReportedElsewhere, UserError
from launchers.preemption import INTERRUPTED_EXIT_CODE, STOP

# name: ("module:register function", the one-line help of `e2d2 --help`). One line each.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("launchers.demo:register", "preprocess, pretrain on 2 CPU ranks, evaluate, sample"),
    "data": ("data_tools.cli:register", "corpora, tokenizers, indexed datasets"),
    "pretrain": ("launchers.pretrain:register",
                 "pretrain on the megatron-core engine (any TP/PP/DP layout)"),
    "sample": ("launchers.sample:register", "generate text from a pretraining checkpoint"),
    "export-hf": ("launchers.hf.cli:register_export_hf",
                  "export a training checkpoint as a Hugging Face model directory"),
    "import-hf": ("launchers.hf.cli:register_import_hf",
                  "convert a Hugging Face model (or our own export) into a training checkpoint"),
    "submit": ("launchers.submit:register", "submit `e2d2 pretrain CONFIG` as a SLURM job"),
    "sweep": ("launchers.sweep.cli:register", "scaling-law sweeps over decoder depth"),
    "profile": ("launchers.profile:register", "per-module FLOPs and time of one model"),
    "eval": ("launchers.eval.nelbo:register", "NELBO / perplexity bound on held-out data"),
    "lm-eval": ("launchers.eval.cli:register_lm_eval",
                "lm-evaluation-harness with the model registered as `e2d2`"),
}


def _command_of(argv: list[str]) -> str | None:
    """The subcommand named in ``argv`` (its first word that is not an option)."""
    return next((word for word in argv if not word.startswith("-")), None)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser, with the subcommand that ``argv`` names registered by its module and
    every other one only listed (all of them registered when ``argv`` is None)."""
    parser = argparse.ArgumentParser(
        prog="e2d2", description="E2D2 block-diffusion language models: data, training, sampling.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = None if argv is None else _command_of(argv)
    for name, (target, help_text) in COMMANDS.items():
        if argv is None or name == chosen:
            module, _, function = target.partition(":")
            getattr(importlib.import_module(module), function)(sub)
        else:
            sub.add_parser(name, help=help_text, add_help=False)
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """``argv`` parsed; options may follow the overrides (argparse alone stops at the first
    option after a ``nargs="*"`` positional and calls the rest unrecognized)."""
    parser = build_parser(argv)
    args, extra = parser.parse_known_args(argv)
    if extra:
        overrides = [word for word in extra if "=" in word and not word.startswith("-")]
        if len(overrides) != len(extra) or not hasattr(args, "overrides"):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *overrides]
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    # `e2d2 pretrain` notes stop signals from its first moment (the imports below alone take
    # seconds): a preemption then must requeue the job, not kill it (launchers.preemption).
    with STOP.installed() if argv[:1] == ["pretrain"] else contextlib.nullcontext():
        return _run(argv)


def _run(argv: list[str]) -> int:
    # megatron-core warns at import on every machine without TE/Apex; the FP8 path checks for
    # TE itself and fails with a clear error, so the warning is only noise on the CLI.
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    # megatron-core's own deprecation noise about options this project never sets.
    warnings.filterwarnings("ignore", message="full scope is deprecated")
    warnings.filterwarnings("ignore", message=".*load_state_dict. is deprecated", category=FutureWarning)
    try:
        args = parse_args(argv)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    except ReportedElsewhere as exc:  # another rank printed the error
        return exc.code
    except UserError as exc:  # one clear message, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
