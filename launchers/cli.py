"""The ``e2d2`` command line.

Each subsystem owns its subcommands and registers them here through a
``register(subparsers)`` function, so this file stays a thin router. Registration
imports are cheap (each module imports its heavy dependencies inside its handlers).
"""

from __future__ import annotations

import argparse
import sys
import warnings

from e2d2.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    from data_tools.cli import register as register_data
    from launchers.demo import register as register_demo
    from launchers.eval.cli import register as register_eval
    from launchers.hf.cli import register_export_hf, register_import_hf
    from launchers.pretrain import register as register_pretrain
    from launchers.profile import register as register_profile
    from launchers.sample import register as register_sample
    from launchers.submit import register as register_submit
    from launchers.sweep.cli import register as register_sweep

    parser = argparse.ArgumentParser(
        prog="e2d2", description="E2D2 block-diffusion language models: data, training, sampling."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for register in (register_demo, register_data, register_pretrain, register_sample,
                     register_export_hf, register_import_hf, register_submit, register_sweep,
                     register_profile, register_eval):
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # megatron-core warns at import on every machine without TE/Apex; the FP8 path checks for
    # TE itself and fails with a clear error, so the warning is only noise on the CLI.
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    # megatron-core's own deprecation noise about options this project never sets.
    warnings.filterwarnings("ignore", message="full scope is deprecated")
    warnings.filterwarnings("ignore", message=".*load_state_dict. is deprecated", category=FutureWarning)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except UserError as exc:  # one clear message, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
