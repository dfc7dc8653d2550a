"""Preprocessing throughput beside the raw ``tokenizers`` encode rate on the same text.

    .venv/bin/python benchmarks/bench_preprocess.py [--corpus kjv shakespeare] [--copies 4]
        [--workers 1 2] [--repeats 3] [--no-cli]

The corpus (the embedded kjv + shakespeare, written ``--copies`` times as JSON lines into a
temporary directory, about 38 MB at 4 copies) is tokenized with the GPT-2 tokenizer.

* raw: ``encode_batch_fast`` on the documents in the pipeline's chunks, in memory, no I/O, one
  thread (``TOKENIZERS_PARALLELISM=false``). This is the per-worker limit. It is measured on one
  copy of the corpus right before every pipeline run, so each ratio compares rates taken
  seconds apart (the machine may be shared). "threaded" is the same with tokenizers' own
  thread pool, for reference.
* in-process: ``preprocess()`` called in this (already warm) process, all copies: tokenizer
  load, worker start-up, reading, encoding, writing, hashing, merge.
* steady state: the marginal rate between a 1-copy and an N-copy run, (tokens_N - tokens_1) /
  (seconds_N - seconds_1): what each further byte costs once fixed costs are paid.
* CPU efficiency: the CPU seconds the raw encoder needs for the corpus over the CPU seconds
  the pipeline used (its own process plus its workers). Unlike wall-clock ratios it does not
  depend on how many cores other users leave free.
* CLI: a fresh ``python -m e2d2.cli data preprocess`` process (what a user runs, including
  interpreter start and imports), and the same through a router that registers only the
  ``data`` commands (what it would cost without the ``e2d2`` router's other imports).

Every pipeline run here has ``TOKENIZERS_PARALLELISM=false``: one core per worker, the
comparison the target (>= 0.8x raw per worker) is about. Medians over ``--repeats`` are printed.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _chunks(texts: list[str]) -> list[list[str]]:
    from data_tools.shard import CHUNK_CHARS, CHUNK_DOCS

    chunks, current, chars = [], [], 0
    for text in texts:
        current.append(text)
        chars += len(text)
        if len(current) >= CHUNK_DOCS or chars >= CHUNK_CHARS:
            chunks.append(current)
            current, chars = [], 0
    return chunks + [current] if current else chunks


def _raw_rate(tokenizer, chunks: list[list[str]], threads: str) -> tuple[float, float]:
    """Tokens per wall-clock second and per CPU second of this process."""
    os.environ["TOKENIZERS_PARALLELISM"] = threads
    start, cpu = time.perf_counter(), time.process_time()
    tokens = 0
    for chunk in chunks:
        tokens += sum(map(len, tokenizer.encode_batch(chunk))) + len(chunk)  # + one EOD each
    rates = tokens / (time.perf_counter() - start), tokens / (time.process_time() - cpu)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    return rates


def _cpu_seconds() -> tuple[float, float]:
    """CPU seconds used so far by this process and by its finished child processes."""
    own, children = (resource.getrusage(who) for who in (resource.RUSAGE_SELF,
                                                         resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def _in_process(inputs: list[str], tokenizer: str, output: Path, workers: int) -> tuple:
    """(tokens, wall seconds, CPU seconds of this process, CPU seconds of the workers)."""
    from data_tools.preprocess import preprocess
    from data_tools.shard import PreprocessConfig

    config = PreprocessConfig(inputs=inputs, tokenizer=tokenizer, output=output,
                              workers=workers, valid_docs=100, overwrite=True)
    cpu_before, start = _cpu_seconds(), time.perf_counter()
    manifest = preprocess(config)
    seconds = time.perf_counter() - start
    cpu = [after - before for after, before in zip(_cpu_seconds(), cpu_before, strict=True)]
    return manifest["train"]["tokens"] + manifest["valid"]["tokens"], seconds, *cpu


def _cli(router: list[str], inputs: list[str], tokenizer: str, output: Path, workers: int):
    """(wall seconds, CPU seconds of the process and its workers) of a fresh CLI process."""
    command = [sys.executable, *router, "data", "preprocess", "--input", *inputs, "--tokenizer",
               tokenizer, "--output", str(output), "--workers", str(workers), "--valid-docs",
               "100", "--overwrite"]
    cpu, start = _cpu_seconds()[1], time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start, _cpu_seconds()[1] - cpu


def _data_only_cli() -> int:
    """``e2d2 data ...`` with only the data commands registered (no e2d2.demo import)."""
    from data_tools.cli import register

    parser = argparse.ArgumentParser(prog="e2d2")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(sys.argv[2:])
    return int(args.func(args) or 0)


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    from data_tools.corpus import iter_documents, write_corpus
    from data_tools.tokenizer import load_tokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", nargs="+", default=["kjv", "shakespeare"])
    parser.add_argument("--copies", type=int, default=4, help="corpus repetitions (>= 2)")
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--tokenizer", default="gpt2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-cli", action="store_true", help="skip the fresh-process runs")
    args = parser.parse_args()
    os.environ["TOKENIZERS_PARALLELISM"] = "false"

    tokenizer = load_tokenizer(args.tokenizer)
    texts = [t for name in args.corpus for t in iter_documents(name)]
    chunks = _chunks(texts)
    mb_copy = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    results: dict[str, list[float]] = {}

    def note(key: str, value: float) -> None:
        results.setdefault(key, []).append(value)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        one = []
        for name in args.corpus:
            one.append(str(tmp / f"c0-{name}.jsonl"))
            write_corpus(name, one[-1])
        full = list(one)
        for copy in range(1, args.copies):
            for name, path in zip(args.corpus, one, strict=True):
                full.append(str(tmp / f"c{copy}-{name}.jsonl"))
                os.link(path, full[-1])
        mb_full = mb_copy * args.copies
        print(f"corpus {'+'.join(args.corpus)} x{args.copies}: {len(texts) * args.copies:,} "
              f"documents, {mb_full:.1f} MB of text in {len(full)} jsonl files; tokenizer "
              f"{args.tokenizer}; {os.cpu_count()} CPU cores; load average at start {_load()}")
        here = str(Path(__file__).resolve())
        for repeat in range(args.repeats):
            note("threaded", _raw_rate(tokenizer, chunks, "true")[0])
            for workers in args.workers:
                raw, raw_per_cpu_s = _raw_rate(tokenizer, chunks, "false")
                note("raw", raw)
                small_tokens, small_s, _, _ = _in_process(one, args.tokenizer, tmp / "out",
                                                          workers)
                tokens, seconds, main_cpu, worker_cpu = _in_process(full, args.tokenizer,
                                                                    tmp / "out", workers)
                note(f"w{workers} main cpu", main_cpu)
                note(f"w{workers} worker cpu", worker_cpu)
                # Load-independent: CPU the raw encoder needs for these tokens / CPU used.
                note(f"w{workers} efficiency", tokens / raw_per_cpu_s / (main_cpu + worker_cpu))
                steady = (tokens - small_tokens) / (seconds - small_s)
                note(f"w{workers} in-process", tokens / seconds / workers / raw)
                note(f"w{workers} in-process tok/s", tokens / seconds)
                note(f"w{workers} in-process s", seconds)
                note(f"w{workers} steady", steady / workers / raw)
                note(f"w{workers} steady tok/s", steady)
                if not args.no_cli:
                    e2e, e2e_cpu = _cli(["-m", "e2d2.cli"], full, args.tokenizer, tmp / "cli",
                                        workers)
                    data, data_cpu = _cli([here, "--data-cli"], full, args.tokenizer,
                                          tmp / "cli", workers)
                    note(f"w{workers} cli cpu", e2e_cpu)
                    note(f"w{workers} cli efficiency", tokens / raw_per_cpu_s / e2e_cpu)
                    note(f"w{workers} data-cli cpu", data_cpu)
                    note(f"w{workers} data-cli efficiency", tokens / raw_per_cpu_s / data_cpu)
                    note(f"w{workers} cli s", e2e)
                    note(f"w{workers} cli", tokens / e2e / workers / raw)
                    note(f"w{workers} data-cli s", data)
                    note(f"w{workers} data-cli", tokens / data / workers / raw)
            print(f"  repeat {repeat + 1}/{args.repeats} done, load average {_load()}", flush=True)

    med = {key: statistics.median(values) for key, values in results.items()}
    print(f"raw encode_batch, 1 thread : {med['raw']:10,.0f} tok/s "
          f"(min {min(results['raw']):,.0f}, max {max(results['raw']):,.0f})")
    print(f"raw encode_batch, threaded : {med['threaded']:10,.0f} tok/s")
    print("per-worker ratio = pipeline tok/s / workers / raw 1-thread tok/s of the same repeat")
    for w in args.workers:
        rate = med[f"w{w} in-process tok/s"]
        seconds = med[f"w{w} in-process s"]
        print(f"--workers {w}: in-process {rate:10,.0f} tok/s {mb_full / seconds:5.2f} MB/s "
              f"{seconds:5.1f} s, per worker {med[f'w{w} in-process']:.2f}x; "
              f"steady state {med[f'w{w} steady tok/s']:10,.0f} tok/s, per worker "
              f"{med[f'w{w} steady']:.2f}x")
        print(f"             CPU seconds: main process {med[f'w{w} main cpu']:.1f}, worker "
              f"processes {med[f'w{w} worker cpu']:.1f}; CPU efficiency (raw encoder's CPU "
              f"seconds for these tokens / all CPU seconds used) {med[f'w{w} efficiency']:.2f}")
        if not args.no_cli:
            for key, label in (("cli", "e2d2 CLI        "), ("data-cli", "data-only router")):
                print(f"             fresh process, {label}: {med[f'w{w} {key} s']:5.1f} s "
                      f"({med[f'w{w} {key}']:.2f}x per worker), {med[f'w{w} {key} cpu']:5.1f} "
                      f"CPU s, CPU efficiency {med[f'w{w} {key} efficiency']:.2f}")
    print(f"load average at end {_load()}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--data-cli"]:
        sys.exit(_data_only_cli())
    main()
