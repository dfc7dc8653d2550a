"""``e2d2 export-hf`` and ``e2d2 import-hf``: argument parsing only (the work, and its heavy
imports, are in `launchers.hf.export` and `launchers.hf.import_hf`)."""

from __future__ import annotations

import argparse


def _export(args: argparse.Namespace) -> int:
    from launchers.checkpoint_dirs import locate

    locate(args.checkpoint)  # a wrong path fails at once, before torch and transformers load
    from launchers.hf.export import export_hf

    out = export_hf(args.checkpoint, args.output, args.max_shard_size, args.dtype, args.ema,
                    args.overwrite, args.tokenizer)
    files = sorted(p.name for p in out.iterdir())
    print(f"wrote {out}: {', '.join(files)}")
    if not any(name == "tokenizer.json" for name in files):
        print("note: no tokenizer found (no RUN/tokenizer nor DATA/tokenizer); pass "
              "--tokenizer DIR to include one")
    print(f"load it with AutoModelForMaskedLM.from_pretrained({str(out)!r}, trust_remote_code=True)")
    return 0


def register_export_hf(subparsers) -> None:
    p = subparsers.add_parser("export-hf", help="export a training checkpoint as a Hugging Face "
                              "model directory (trust_remote_code)")
    p.add_argument("checkpoint", metavar="CKPT_OR_RUN_DIR",
                   help="a run directory (uses checkpoints/latest) or an iter directory")
    p.add_argument("output", metavar="OUT", help="new directory to write")
    p.add_argument("--max-shard-size", default="5GB",
                   help="largest safetensors file before sharding (default 5GB)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="float32")
    p.add_argument("--ema", action="store_true", help="export the EMA weights")
    p.add_argument("--tokenizer", help="a tokenizer directory, gpt2 or bytes (default: the "
                   "run's tokenizer, RUN/tokenizer or DATA/tokenizer)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.set_defaults(func=_export)


def _import(args: argparse.Namespace) -> int:
    from launchers.checkpoint_dirs import CONFIG_NAME
    from launchers.hf.import_hf import import_hf

    out = import_hf(args.hf_dir, args.output, args.variant, args.decoder_layers, args.tie_decoder,
                    args.decoder_from, args.tp, args.pp, args.encoder_pipeline_stages,
                    args.block_size, args.seq_length, args.mask_token_id, args.allow_pickle,
                    args.overwrite, args.shift)
    print(f"wrote {out} and {out / CONFIG_NAME}; train from it with:\n"
          f"  e2d2 pretrain CONFIG.yaml checkpoint.init={out}\n"
          f"with CONFIG.yaml's model section equal to {out / CONFIG_NAME}'s, and data "
          f"preprocessed with --tokenizer {args.hf_dir}")
    return 0


def register_import_hf(subparsers) -> None:
    p = subparsers.add_parser("import-hf", help="convert a local Qwen3/Llama causal LM, or an "
                              "e2d2 export-hf export, into a training checkpoint")
    p.add_argument("hf_dir", metavar="HF_DIR", help="directory with config.json and safetensors")
    p.add_argument("output", metavar="OUT_CHECKPOINT", help="new checkpoint directory")
    p.add_argument("--variant", help="the variant to build from a causal LM (required there); "
                   "an e2d2 export-hf export keeps its own")
    p.add_argument("--decoder-layers", type=int, default=1, help="E2D2 decoder depth (default 1)")
    p.add_argument("--decoder-from", choices=("top", "bottom"), default="top",
                   help="which causal-LM layers initialise the decoder (default top)")
    p.add_argument("--tie-decoder", action="store_true",
                   help="e2d2_shared_kv: the decoder is the top encoder layers (no copies)")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size to validate for")
    p.add_argument("--pp", type=int, default=1, help="pipeline parallel size to validate for")
    p.add_argument("--encoder-pipeline-stages", type=int,
                   help="E2D2 with --pp > 1: encoder stages (default pp - 1)")
    p.add_argument("--block-size", type=int, default=4, help="diffusion block size (default 4)")
    p.add_argument("--seq-length", type=int,
                   help="training sequence length (default min(max_position_embeddings, 2048))")
    p.add_argument("--mask-token-id", type=int, help="mask token id (default: the tokenizer's "
                   "mask token, else its first unused id)")
    p.add_argument("--shift", action="store_true", help="write model.shift=true: slot s "
                   "predicts token s + 1, as the AR model did (adapting it, docs/hf.md)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read pytorch_model.bin with torch.load(weights_only=True)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT_CHECKPOINT")
    p.set_defaults(func=_import)
