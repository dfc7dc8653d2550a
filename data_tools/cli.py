"""``e2d2 data {corpus,train-tokenizer,preprocess,merge,inspect}``: argument parsing only."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _corpus(args: argparse.Namespace) -> int:
    from data_tools.corpus import write_corpus

    count = write_corpus(args.name, args.output, args.overwrite)
    print(f"wrote {count:,} documents of {args.name} to {args.output}")
    return 0


def _train_tokenizer(args: argparse.Namespace) -> int:
    from data_tools.train_tokenizer import train_tokenizer

    tokenizer = train_tokenizer(
        args.input, args.output, args.vocab_size, args.text_key, args.skip_bad_records,
        args.overwrite,
    )
    print(f"wrote {args.output} (vocab {tokenizer.vocab_size}, sha256 {tokenizer.sha256[:12]})")
    return 0


def _preprocess(args: argparse.Namespace) -> int:
    from data_tools.preprocess import preprocess
    from data_tools.shard import PreprocessConfig

    config = PreprocessConfig(
        inputs=args.input,
        tokenizer=args.tokenizer,
        output=Path(args.output),
        text_key=args.text_key,
        workers=args.workers,
        valid_docs=args.valid_docs,
        valid_fraction=args.valid_fraction,
        skip_bad_records=args.skip_bad_records,
        overwrite=args.overwrite,
        dtype=args.dtype,
        num_shards=args.num_shards,
        shard_index=args.shard_index,
        split_seed=args.split_seed,
        valid_inputs=args.valid_input,
    )
    manifest = preprocess(config)
    if manifest is None:
        print(
            f"wrote shard {config.shard_index} of {config.num_shards} to {config.output}/shards; "
            f"when all are done run: e2d2 data merge {config.output}"
        )
    else:
        _print_summary(config.output, manifest)
    return 0


def _merge(args: argparse.Namespace) -> int:
    from data_tools.merge import merge

    _print_summary(Path(args.output), merge(Path(args.output), args.overwrite, args.shards))
    return 0


def _print_summary(output: Path, manifest: dict) -> None:
    for split in ("train", "valid"):
        stats = manifest[split]
        skipped = sum(stats["skipped"].values())
        print(
            f"{output / split}: {stats['documents']:,} documents, {stats['tokens']:,} tokens, "
            f"{skipped:,} records skipped"
        )


def _inspect(args: argparse.Namespace) -> int:
    from data_tools.inspect_data import format_report, inspect_path

    reports, verified = inspect_path(args.path, args.tokenizer, args.verify)
    checked = ("sizes, counts, checksums and every token id" if args.verify else
               "sizes, counts and the recorded largest id")
    if args.json:
        for report in reports:
            report["verified"] = checked
            report["notes"] = [n for n in verified.notes if n.startswith(f"{report['prefix']}:")]
        print(json.dumps(reports, indent=2))
    else:
        print("\n".join(map(format_report, reports)))
        print(f"verified: {checked}" + "".join(f"\n  note: {n}" for n in verified.notes))
    return 0


def _add_record_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH",
                        help="jsonl/json/txt (also .gz/.bz2/.xz/.zst) and parquet files, globs, "
                             "directories, datasets dirs")
    parser.add_argument("--text-key", default="text", help="record field holding the text")
    parser.add_argument("--skip-bad-records", action="store_true",
                        help="count and skip malformed records instead of stopping")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")


def register(subparsers) -> None:
    """Add ``data`` and its subcommands to the ``e2d2`` command line."""
    data = subparsers.add_parser("data", help="corpora, tokenizers, indexed datasets")
    sub = data.add_subparsers(dest="data_command", required=True)

    p = sub.add_parser("corpus", help="write an embedded offline corpus as JSON lines")
    p.add_argument("name", choices=("kjv", "shakespeare", "pydoc"))
    p.add_argument("--output", required=True, help="the .jsonl file to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    p.set_defaults(func=_corpus)

    p = sub.add_parser("train-tokenizer", help="train a byte-level BPE tokenizer")
    _add_record_options(p)
    p.add_argument("--output", required=True, help="directory for tokenizer.json")
    p.add_argument("--vocab-size", type=int, default=32768)
    p.set_defaults(func=_train_tokenizer)

    p = sub.add_parser("preprocess", help="tokenize into megatron indexed datasets")
    _add_record_options(p)
    p.add_argument("--tokenizer", required=True, help="gpt2, bytes, or a tokenizer directory")
    p.add_argument("--output", required=True, help="directory for train/valid .bin/.idx")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    split = p.add_mutually_exclusive_group()
    split.add_argument("--valid-docs", type=int,
                       help="hold out N documents, chosen by a seeded hash of their tokens")
    split.add_argument("--valid-fraction", type=float,
                       help="hold out this fraction of the documents (default 0.01), chosen "
                            "by a seeded hash of their tokens")
    split.add_argument("--valid-input", nargs="+", metavar="PATH",
                       help="a separate validation set (files, globs or directories); all "
                            "of --input then trains")
    p.add_argument("--split-seed", type=int, default=0,
                   help="seed of the hash that picks the validation documents")
    p.add_argument("--dtype", default="auto", choices=("auto", "uint16", "int32"),
                   help="token dtype; auto = uint16 when the vocabulary fits")
    p.add_argument("--num-shards", type=int, default=1, help="split the work into N shards")
    p.add_argument("--shard-index", type=int, default=0, help="which shard this process writes")
    p.set_defaults(func=_preprocess)

    p = sub.add_parser("merge", help="join shards written with --num-shards")
    p.add_argument("output", help="the preprocess --output directory")
    p.add_argument("--shards", help="shard directory (default OUTPUT/shards)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(func=_merge)

    p = sub.add_parser("inspect", help="counts, length histogram, decoded sample")
    p.add_argument("path", help="a preprocess output directory or a dataset prefix")
    p.add_argument("--tokenizer", help="tokenizer for the sample (default: DIR/tokenizer)")
    p.add_argument("--json", action="store_true", help="print machine-readable statistics")
    p.add_argument("--verify", action="store_true",
                   help="also check the files' checksums and every token id (reads everything)")
    p.set_defaults(func=_inspect)
