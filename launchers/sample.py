"""``e2d2 sample RUN_DIR_OR_CHECKPOINT --prompt TEXT ... --max-new-tokens N``: text from a checkpoint.

The checkpoint (of any TP/PP/DP layout) is read into the reference model
(``e2d2.model.DiffusionLM``) on one process, and ``e2d2.sampling`` generates with its KV
cache, prompts of any lengths batched together (the AR baseline autoregressively). Sampler settings default to the run's ``sampler`` section. ``--json`` prints one
object per sample: ``{"prompt", "tokens" (the generated ids), "text" (their decoding)}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from e2d2.errors import UserError


def register(subparsers) -> None:
    p = subparsers.add_parser("sample", help="generate text from a pretraining checkpoint",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a run directory (its latest checkpoint) or an iter_* directory")
    p.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    p.add_argument("--max-new-tokens", type=int, required=True)
    p.add_argument("--strategy", help="override sampler.strategy")
    p.add_argument("--steps", type=int, help="override sampler.steps (denoising steps per block)")
    p.add_argument("--temperature", type=float, help="override sampler.temperature (0 = greedy)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts sampled together")
    p.add_argument("--seed", type=int, default=0, help="prompt i samples with seed + i")
    p.add_argument("--ema", action="store_true", help="sample with the EMA weights")
    p.add_argument("--json", action="store_true", help="one JSON object per sample")
    p.set_defaults(func=_command)


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
    from e2d2.sampling import sample_prompts
    from launchers.checkpointing import resolve_checkpoint

    if args.max_new_tokens < 1 or args.batch_size < 1:
        raise UserError("--max-new-tokens and --batch-size must be >= 1")
    checkpoint = resolve_checkpoint(args.checkpoint)
    cfg, model = load_reference_model(checkpoint, args.ema)
    tokenizer = run_tokenizer(cfg, checkpoint)
    overrides = {k: v for k, v in (("strategy", args.strategy), ("steps", args.steps),
                                   ("temperature", args.temperature)) if v is not None}
    sampler = dataclasses.replace(cfg.sampler, max_new_tokens=args.max_new_tokens,
                                  eos_token_id=cfg.sampler.eos_token_id
                                  if cfg.sampler.eos_token_id is not None else tokenizer.eod,
                                  **overrides)
    prompts = [tokenizer.encode(text) for text in args.prompt]
    for start in range(0, len(prompts), args.batch_size):
        chunk = prompts[start:start + args.batch_size]
        # Prompt i draws from seed + i: a sample does not depend on --batch-size.
        seeds = [args.seed + i for i in range(start, start + len(chunk))]
        completions = sample_prompts(model, chunk, sampler, seeds=seeds, decode=tokenizer.decode)
        for text, ids in zip(args.prompt[start:], completions, strict=False):
            completion = tokenizer.decode(ids)
            if args.json:
                print(json.dumps({"prompt": text, "tokens": ids, "text": completion}))
            else:
                print(f"{text}{completion}")
    return 0
