"""``e2d2 demo``: train a tiny E2D2 on the embedded KJV corpus on CPU, evaluate, and sample.

Runs offline in a few minutes on 2 cores. It prints the falling training loss and the
validation NELBO (nats/token, with its Monte-Carlo standard error), then a sample from the
block sampler with KV cache, and logs to TensorBoard under ``--log-dir``.
"""

from __future__ import annotations

import argparse
import time

import torch

from e2d2.config import DiffusionConfig, ModelConfig
from e2d2.diffusion import DiffusionObjective
from e2d2.errors import UserError
from e2d2.evaluate import NelboResult
from e2d2.model import DiffusionLM
from e2d2.train import TrainConfig, pack_documents, train

PROMPT = "And God said, "


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="train a tiny E2D2 on CPU on the embedded corpus and sample")
    p.add_argument("--variant", default="e2d2", help="e2d2 | e2d2_shared_kv | bd3lm | mdlm (default e2d2)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--block-size", type=int, default=4)
    p.add_argument("--sample-tokens", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-dir", default="runs/demo", help="TensorBoard directory ('' to disable)")
    p.set_defaults(func=run)


def demo_model_config(variant: str, vocab_size: int, mask_token_id: int, seq_length: int, block_size: int) -> ModelConfig:
    """The embedded tiny model: 4 encoder layers + 1 decoder layer, hidden 128 (~0.8M params)."""
    e2d2 = variant in ("e2d2", "e2d2_shared_kv")
    return ModelConfig(
        variant=variant, vocab_size=vocab_size, mask_token_id=mask_token_id, hidden_size=128,
        ffn_hidden_size=384, num_attention_heads=4, num_query_groups=2,
        num_layers=4 if e2d2 else 5, num_decoder_layers=1 if e2d2 else 0,
        seq_length=seq_length, block_size=block_size,
    )


def run(args: argparse.Namespace) -> int:
    from data_tools.corpus import iter_documents
    from data_tools.tokenizer import load_tokenizer
    from e2d2.sampling import SamplerConfig, sample

    if args.variant == "ar":
        raise UserError("the demo samples with the block-diffusion sampler; choose a diffusion variant")
    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    tok = load_tokenizer("bytes")
    docs = list(iter_documents("kjv"))
    n_valid = max(1, len(docs) // 50)  # hold out the last 2% of chapters
    train_rows = pack_documents(tok.encode_batch(docs[:-n_valid]), args.seq_length, tok.eod)
    valid_rows = pack_documents(tok.encode_batch(docs[-n_valid:]), args.seq_length, tok.eod)
    model_cfg = demo_model_config(args.variant, tok.vocab_size, tok.mask_id, args.seq_length, args.block_size)
    model = DiffusionLM(model_cfg)
    objective = DiffusionObjective(model_cfg, DiffusionConfig())
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, seed=args.seed,
                      eval_every=max(1, args.steps // 6), log_dir=args.log_dir or None)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"E2D2 demo: variant={args.variant}  params={n_params / 1e6:.2f}M  "
          f"train={train_rows.numel():,} tokens  valid={valid_rows.numel():,} tokens  "
          f"L={args.seq_length} S={args.block_size}")

    def report(step: int, result: NelboResult, avg_loss: float) -> None:
        loss = "" if step == 0 else f"train loss {avg_loss:.3f}  "
        print(f"step {step:5d}  {loss}valid NELBO {result.nelbo:.3f} ± {result.std_error:.3f} "
              f"nats/token (ppl <= {result.perplexity:.1f})", flush=True)

    start = time.perf_counter()
    history = train(model, objective, train_rows, valid_rows, cfg, on_eval=report)
    first, last = history.evals[0][1], history.evals[-1][1]
    print(f"trained {cfg.steps} steps in {time.perf_counter() - start:.0f}s: valid NELBO "
          f"{first.nelbo:.3f} -> {last.nelbo:.3f} nats/token")

    model.eval()
    prompt = torch.tensor([tok.encode(PROMPT)])
    sampler = SamplerConfig(strategy="topk", steps=args.block_size, max_new_tokens=args.sample_tokens,
                            eos_token_id=tok.eod, temperature=0.8)
    with torch.no_grad():
        out = sample(model, prompt, sampler, generator=torch.Generator().manual_seed(args.seed))
    text = tok.decode(out.tokens[0, : out.lengths[0]].tolist())
    print(f"sample ({out.nfe} decoder calls for {out.lengths[0] - prompt.shape[1]} tokens):")
    print(f"  {text!r}")
    return 0
