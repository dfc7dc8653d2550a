"""``e2d2 demo``: train a tiny E2D2 on the embedded KJV corpus on CPU, evaluate, and sample.

Runs offline in a few minutes on 2 cores. It prints the falling training loss and the
validation NELBO (nats/token, with its Monte-Carlo standard error), then a sample from the
block sampler with KV cache, and logs to TensorBoard under ``--log-dir``.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch
from tqdm.auto import tqdm

from e2d2.config import DiffusionConfig, ModelConfig
from e2d2.diffusion import DiffusionObjective
from e2d2.errors import UserError
from e2d2.evaluate import NelboResult
from e2d2.model import DiffusionLM
from e2d2.sampling import SamplerConfig, sample
from e2d2.train import TrainConfig, pack_documents, train
from launchers.config import RunConfig, load_run_config

PROMPT = "And God said, "


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="train a tiny E2D2 on CPU on the embedded corpus and sample")
    p.add_argument("--config", help="YAML run config (default: the embedded tiny config, "
                   "identical to configs/tiny-cpu.yaml)")
    p.add_argument("--variant", help="override model.variant: e2d2 | e2d2_shared_kv | bd3lm | mdlm")
    p.add_argument("--steps", type=int, help="override train.steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-dir", default="runs/demo", help="TensorBoard directory ('' to disable)")
    p.set_defaults(func=run)


# The embedded default (a test keeps configs/tiny-cpu.yaml equal to it).
DEMO_CONFIG = RunConfig(
    model=ModelConfig(
        variant="e2d2", vocab_size=260, mask_token_id=259, hidden_size=128, ffn_hidden_size=384,
        num_attention_heads=4, num_query_groups=2, num_layers=4, num_decoder_layers=1,
        seq_length=128, block_size=4,
    ),
    diffusion=DiffusionConfig(schedule="linear", loss_weighting="none"),
    train=TrainConfig(steps=600, batch_size=32, lr=3e-3, warmup_steps=50),
    sampler=SamplerConfig(strategy="topk", steps=4, temperature=0.8, max_new_tokens=96),
)


def _with_overrides(cfg: RunConfig, args: argparse.Namespace, eod: int, log_dir: str | None) -> RunConfig:
    model = cfg.model
    if args.variant:
        if args.variant == "ar":
            raise UserError("the demo samples with the block-diffusion sampler; choose a diffusion variant")
        e2d2 = args.variant in ("e2d2", "e2d2_shared_kv")
        # Same total depth for every variant, so their numbers compare.
        total = model.num_layers + model.num_decoder_layers
        model = model.replace(variant=args.variant, num_layers=total - 1 if e2d2 else total,
                              num_decoder_layers=1 if e2d2 else 0)
    steps = args.steps or cfg.train.steps
    train = dataclasses.replace(cfg.train, steps=steps, seed=args.seed, log_dir=log_dir,
                                warmup_steps=min(cfg.train.warmup_steps, steps),
                                eval_every=max(1, steps // 6))
    sampler = dataclasses.replace(cfg.sampler, eos_token_id=eod)
    return dataclasses.replace(cfg, model=model, train=train, sampler=sampler)


def run(args: argparse.Namespace) -> int:
    from data_tools.corpus import iter_documents
    from data_tools.tokenizer import load_tokenizer

    torch.manual_seed(args.seed)
    tok = load_tokenizer("bytes")
    base = load_run_config(args.config) if args.config else DEMO_CONFIG
    if (base.model.vocab_size, base.model.mask_token_id) != (tok.vocab_size, tok.mask_id):
        raise UserError(f"the demo uses the bytes tokenizer (vocab {tok.vocab_size}, mask {tok.mask_id}); "
                        f"set model.vocab_size and model.mask_token_id to match")
    cfg = _with_overrides(base, args, tok.eod, args.log_dir or None)
    docs = list(iter_documents("kjv"))
    n_valid = max(1, len(docs) // 50)  # hold out the last 2% of chapters
    seq = cfg.model.seq_length
    train_rows = pack_documents(tok.encode_batch(docs[:-n_valid]), seq, tok.eod)
    valid_rows = pack_documents(tok.encode_batch(docs[-n_valid:]), seq, tok.eod)
    model = DiffusionLM(cfg.model)
    objective = DiffusionObjective(cfg.model, cfg.diffusion)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"E2D2 demo: variant={cfg.model.variant}  params={n_params / 1e6:.2f}M  "
          f"train={train_rows.numel():,} tokens  valid={valid_rows.numel():,} tokens  "
          f"L={seq} S={cfg.model.block_size}")

    def report(step: int, result: NelboResult, avg_loss: float) -> None:
        loss = "" if step == 0 else f"train loss {avg_loss:.3f}  "
        # tqdm.write keeps the line intact while the progress bar is drawn
        tqdm.write(f"step {step:5d}  {loss}valid NELBO {result.nelbo:.3f} ± {result.std_error:.3f} "
                   f"nats/token (ppl <= {result.perplexity:.1f})")

    start = time.perf_counter()
    history = train(model, objective, train_rows, valid_rows, cfg.train, on_eval=report)
    first, last = history.evals[0][1], history.evals[-1][1]
    print(f"trained {cfg.train.steps} steps in {time.perf_counter() - start:.0f}s: valid NELBO "
          f"{first.nelbo:.3f} -> {last.nelbo:.3f} nats/token")

    model.eval()
    prompt = torch.tensor([tok.encode(PROMPT)])
    out = sample(model, prompt, cfg.sampler, generator=torch.Generator().manual_seed(args.seed))
    n_new = int(out.lengths[0]) - prompt.shape[1]
    print(f"sample ({cfg.sampler.strategy}, {out.nfe} denoiser calls for {n_new} tokens, KV cache):")
    print(f"  {tok.decode(out.tokens[0, : out.lengths[0]].tolist())!r}")
    return 0
