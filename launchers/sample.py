"""``e2d2 sample RUN_DIR_OR_CHECKPOINT --prompt TEXT ...``: text from a checkpoint.

The checkpoint (of any TP/PP/DP layout) is read into the reference model
(``e2d2.model.DiffusionLM``) on one process, and ``e2d2.sampling`` generates with its KV
cache, prompts of any lengths batched together (the AR baseline autoregressively). Sampler
settings default to the run's ``sampler`` section; every ``SamplerConfig`` field has a flag
(``--top-p``, ``--stop``, ``--sliding-window``, ...; docs/sampling.md). Each sample is printed
under a numbered header line; ``--json`` prints one object per sample instead:
``{"sample", "seed", "prompt", "tokens" (the generated ids), "text" (their decoding)}``.

torch is imported once the flags and the config are checked (``--help`` answers at once).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path

from e2d2.config import SamplerConfig
from e2d2.errors import UserError

# Command-line names besides the field's own (``--stop-strings``).
FLAG_ALIASES = {"stop_strings": ("--stop",)}


def register(subparsers) -> None:
    p = subparsers.add_parser("sample", help="generate text from a pretraining checkpoint",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a run directory (its latest checkpoint) or an iter_* directory")
    p.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    p.add_argument("--batch-size", type=int, default=8, help="prompts sampled together")
    p.add_argument("--seed", type=int, default=0, help="prompt i samples with seed + i")
    p.add_argument("--ema", action="store_true", help="sample with the EMA weights")
    p.add_argument("--json", action="store_true", help="one JSON object per sample")
    add_sampler_flags(p)
    p.set_defaults(func=_command)


def _none_or(kind: type):
    """An argparse type for an optional field: ``none`` gives None."""

    def parse(text: str):
        return None if text.lower() == "none" else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its error message
    return parse


def add_sampler_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per `SamplerConfig` field (``top_p`` -> ``--top-p``), generated from the
    dataclass; an unset flag leaves the attribute out of the namespace (`sampler_overrides`)."""
    group = parser.add_argument_group("sampler settings (default: the run's sampler section)")
    hints = typing.get_type_hints(SamplerConfig)
    for field in dataclasses.fields(SamplerConfig):
        hint, flags = hints[field.name], ("--" + field.name.replace("_", "-"), *FLAG_ALIASES.get(field.name, ()))
        kwargs: dict = {"dest": field.name, "default": argparse.SUPPRESS}
        args = typing.get_args(hint)
        if hint is bool:
            kwargs.update(action=argparse.BooleanOptionalAction, help=f"sampler.{field.name}")
        elif typing.get_origin(hint) is tuple:  # stop_strings: repeat the flag
            kwargs.update(action="append", type=args[0], metavar="TEXT",
                          help=f"sampler.{field.name}, one per flag")
        elif typing.get_origin(hint) in (typing.Union, types.UnionType):  # X | None
            (kind,) = [a for a in args if a is not type(None)]
            kwargs.update(type=_none_or(kind), metavar=kind.__name__.upper(),
                          help=f"sampler.{field.name} (none: unset)")
        else:
            kwargs.update(type=hint, metavar=hint.__name__.upper(), help=f"sampler.{field.name}")
        group.add_argument(*flags, **kwargs)


def sampler_overrides(args: argparse.Namespace) -> dict:
    """The `SamplerConfig` fields given on the command line."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(SamplerConfig) if hasattr(args, f.name)}


def run_tokenizer(cfg, checkpoint: Path):
    """The tokenizer a run trained with: its run directory's copy, else its data directory's."""
    from data_tools.tokenizer import load_tokenizer

    for candidate in [checkpoint.parent.parent / "tokenizer",
                      *(Path(p) / "tokenizer" for p in cfg.data.paths)]:
        if candidate.is_dir():
            return load_tokenizer(candidate)
    raise UserError(f"no tokenizer for {checkpoint}: expected {checkpoint.parent.parent}/tokenizer "
                    "or the run's data.path/tokenizer")


def load_reference_model(checkpoint: Path, ema: bool = False):
    """``(RunConfig, DiffusionLM)`` from an iteration directory, on this process (a gloo world
    of one is created if torch.distributed is not initialized)."""
    import torch

    from e2d2.model import DiffusionLM
    from launchers.config import load_run_config
    from launchers.world import init_world, world_of_one
    from megatron_ext import checkpoint as engine_checkpoint
    from megatron_ext import cpu_compat

    cfg = load_run_config(checkpoint / "config.yaml")
    if not torch.distributed.is_initialized():
        cpu_compat.install()
        init_world(world_of_one("local"))
    prefix = engine_checkpoint.EMA_PREFIX if ema else engine_checkpoint.MODEL_PREFIX
    state = engine_checkpoint.read_model_state(checkpoint, prefix)
    model = DiffusionLM(cfg.model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{checkpoint} does not fit its own config: missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}")
    return cfg, model.eval()


def _command(args: argparse.Namespace) -> int:
    from launchers.checkpoint_dirs import resolve_checkpoint
    from launchers.config import load_run_config

    if args.batch_size < 1:
        raise UserError("--batch-size must be >= 1")
    checkpoint = resolve_checkpoint(args.checkpoint)
    # A bad flag fails here, before the weights are read.
    sampler = dataclasses.replace(load_run_config(checkpoint / "config.yaml").sampler, **sampler_overrides(args))
    from e2d2.sampling import sample_prompts

    cfg, model = load_reference_model(checkpoint, args.ema)
    tokenizer = run_tokenizer(cfg, checkpoint)
    if sampler.eos_token_id is None:
        sampler = dataclasses.replace(sampler, eos_token_id=tokenizer.eod)
    prompts = [tokenizer.encode(text) for text in args.prompt]
    for start in range(0, len(prompts), args.batch_size):
        chunk = prompts[start:start + args.batch_size]
        # Prompt i draws from seed + i: a sample does not depend on --batch-size.
        seeds = [args.seed + i for i in range(start, start + len(chunk))]
        completions = sample_prompts(model, chunk, sampler, seeds=seeds, decode=tokenizer.decode)
        for i, (text, ids) in enumerate(zip(args.prompt[start:], completions, strict=False), start):
            completion = tokenizer.decode(ids)
            if args.json:
                print(json.dumps({"sample": i + 1, "seed": args.seed + i, "prompt": text, "tokens": ids,
                                  "text": completion}))
                continue
            if i:
                print()
            print(f"=== sample {i + 1} of {len(prompts)} (seed {args.seed + i}, {len(ids)} tokens) ===")
            print(f"{text}{completion}")
    return 0
