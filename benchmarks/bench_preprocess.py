"""Preprocessing throughput beside the raw ``tokenizers`` encode rate on the same text.

    .venv/bin/python benchmarks/bench_preprocess.py [--corpus kjv shakespeare] [--workers 1 2]

The raw rate (``encode_batch_fast`` on all documents, in memory, no I/O) is the limit a
pipeline can approach. It is measured single-threaded (the per-worker limit) and with
tokenizers' own thread pool (what one in-process worker uses). The target is a pipeline
rate of at least 0.8x the single-threaded raw rate per worker.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def _raw_rate(tokenizer, texts: list[str], threads: str) -> float:
    os.environ["TOKENIZERS_PARALLELISM"] = threads
    start = time.perf_counter()
    tokens = sum(map(len, tokenizer.encode_batch(texts))) + len(texts)  # + one EOD each
    return tokens / (time.perf_counter() - start)


def main() -> None:
    from data_tools.corpus import iter_documents, write_corpus
    from data_tools.preprocess import preprocess
    from data_tools.shard import PreprocessConfig
    from data_tools.tokenizer import load_tokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", nargs="+", default=["kjv", "shakespeare"])
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--tokenizer", default="gpt2")
    args = parser.parse_args()

    tokenizer = load_tokenizer(args.tokenizer)
    texts = [t for name in args.corpus for t in iter_documents(name)]
    megabytes = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    raw_1 = _raw_rate(tokenizer, texts, "false")
    raw_n = _raw_rate(tokenizer, texts, "true")
    os.environ.pop("TOKENIZERS_PARALLELISM")
    print(f"corpus {'+'.join(args.corpus)}: {len(texts):,} documents, {megabytes:.1f} MB, "
          f"tokenizer {args.tokenizer}, {os.cpu_count()} CPU cores")
    print(f"raw encode_batch, 1 thread : {raw_1:12,.0f} tok/s")
    print(f"raw encode_batch, threaded : {raw_n:12,.0f} tok/s")

    with tempfile.TemporaryDirectory() as tmp:
        inputs = []
        for name in args.corpus:
            inputs.append(str(Path(tmp) / f"{name}.jsonl"))
            write_corpus(name, inputs[-1])
        for workers in args.workers:
            config = PreprocessConfig(
                inputs=inputs, tokenizer=args.tokenizer, output=Path(tmp) / f"out{workers}",
                workers=workers, valid_docs=100,
            )
            start = time.perf_counter()
            manifest = preprocess(config)
            seconds = time.perf_counter() - start
            tokens = manifest["train"]["tokens"] + manifest["valid"]["tokens"]
            rate = tokens / seconds
            print(
                f"preprocess --workers {workers}: {rate:12,.0f} tok/s, {megabytes / seconds:5.2f} "
                f"MB/s, {seconds:6.1f} s end to end; per worker {rate / workers / raw_1:.2f}x "
                f"raw 1-thread, {rate / raw_n:.2f}x raw threaded"
            )


if __name__ == "__main__":
    main()
