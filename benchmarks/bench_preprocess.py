"""Preprocessing throughput at corpus scale, beside the raw ``tokenizers`` encode rate.

    .venv/bin/python benchmarks/bench_preprocess.py [--size-mb 300] [--files 8]
        [--workers 1 2] [--inputs one several zst] [--data-dir benchmarks/data]

The corpus: the embedded kjv + shakespeare + pydoc texts, repeated with per-copy variation
(each copy shuffles the document order and rotates every document's lines by a random amount,
so no two copies hold the same documents and zstd cannot reference a previous copy) until
``--size-mb`` of JSON lines. It is written once into ``--data-dir`` (git-ignored, reused while
its parameters match) three ways: ``one.jsonl``, ``several/part-*.jsonl`` (the same documents in
``--files`` files) and ``one.jsonl.zst``; plus a small prefix of it, ``small.jsonl{,.zst}``.
Whole copies are written, so the corpus is ``--size-mb`` rounded up to a copy (~10 MB).

Every measurement is a fresh ``e2d2 data preprocess`` process (GPT-2 tokenizer,
``TOKENIZERS_PARALLELISM=false``: one core per worker), timed in wall-clock and in CPU seconds
(user + sys) of the main process and of its workers separately.

* steady state: the marginal rate between the small input and the full one,
  (tokens_full - tokens_small) / (seconds_full - seconds_small): what each further byte costs
  once start-up (imports, tokenizer load, worker spawn) is paid. Likewise for CPU seconds.
* raw: ``encode_batch_fast`` on the first ``--raw-mb`` of the corpus's documents, in the
  pipeline's chunks, in memory, no I/O, in a fresh process whose tokenizers thread pool has as
  many threads as the run has workers (``RAYON_NUM_THREADS``). It is measured right before each
  pipeline run, so each ratio compares rates taken seconds apart (the machine may be shared).
* per core, wall: steady tokens/s / raw tokens/s at the same thread count.
* per core, CPU: the raw encoder's CPU seconds per token (1 thread) times the tokens, over the
  CPU seconds the pipeline used for them (steady state, all processes). Unlike wall-clock
  ratios it does not depend on how many cores other users leave free, but on a shared
  machine CPU seconds inflate too (the other hyperthread of the core, caches).
* in-run encoder share: the pipeline's own ``encode_batch`` calls are timed (thread CPU time,
  and wall time) in the main process and in every worker; "encoder CPU share" is their CPU
  seconds over all CPU seconds of the run, "encoders busy" their wall seconds over
  workers x wall seconds (steady state, like the rest). Both are measured within one run, so
  other users' load shifts numerator and denominator alike: the most load-independent
  numbers here. A perfect pipeline scores 1.0 on both.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
CORPORA = ("kjv", "shakespeare", "pydoc")
SMALL_MB = 8


def _variant(texts: list[str], copy: int) -> list[str]:
    """Copy ``copy`` of the documents: shuffled, each document's lines rotated."""
    rng = random.Random(copy)
    order = list(range(len(texts)))
    rng.shuffle(order)
    out = []
    for index in order:
        lines = texts[index].split("\n")
        turn = rng.randrange(len(lines))
        out.append("\n".join(lines[turn:] + lines[:turn]))
    return out


def _build(data_dir: Path, size_mb: int, files: int) -> dict:
    """Write the corpus files (unless ``data_dir`` already holds these); return their stamp."""
    import zstandard

    from data_tools.corpus import iter_documents

    stamp = {"size_mb": size_mb, "files": files, "corpora": CORPORA, "version": 1}
    stamp_path = data_dir / "corpus.json"
    if stamp_path.is_file() and json.loads(stamp_path.read_text())["stamp"] == stamp:
        return json.loads(stamp_path.read_text())
    shutil.rmtree(data_dir, ignore_errors=True)
    (data_dir / "several").mkdir(parents=True)
    texts = [t for name in CORPORA for t in iter_documents(name)]
    target, written, documents, copy = size_mb * 10**6, 0, 0, 0
    parts = [open(data_dir / "several" / f"part-{i:03d}.jsonl", "wb") for i in range(files)]
    start = time.perf_counter()
    with open(data_dir / "one.jsonl", "wb") as one, open(data_dir / "small.jsonl", "wb") as small:
        while written < target:
            for text in _variant(texts, copy):
                line = (json.dumps({"text": text}) + "\n").encode()
                one.write(line)
                parts[min(files - 1, written * files // target)].write(line)
                if written < SMALL_MB * 10**6:
                    small.write(line)
                written += len(line)
                documents += 1
            copy += 1
    for part in parts:
        part.close()
    compressor = zstandard.ZstdCompressor(level=3, threads=-1)  # zstd's default level
    for name in ("one.jsonl", "small.jsonl"):
        with open(data_dir / name, "rb") as src, open(data_dir / f"{name}.zst", "wb") as dst:
            compressor.copy_stream(src, dst)
    info = {"stamp": stamp, "bytes": written, "documents": documents, "copies": copy,
            "zst_bytes": (data_dir / "one.jsonl.zst").stat().st_size,
            "build_s": round(time.perf_counter() - start, 1)}
    stamp_path.write_text(json.dumps(info, indent=1))
    return info


def _raw(sample: Path, threads: int, raw_mb: int) -> dict:
    """Raw encode rate in a fresh process with ``threads`` tokenizer threads."""
    env = os.environ | {"RAYON_NUM_THREADS": str(threads),
                        "TOKENIZERS_PARALLELISM": "true" if threads > 1 else "false"}
    out = subprocess.run([sys.executable, str(HERE), "--raw-child", str(sample), str(raw_mb)],
                         env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[-1])


def _raw_child(sample: str, raw_mb: int) -> None:
    from data_tools.tokenizer import load_tokenizer
    from data_tools.work import CHUNK_CHARS, CHUNK_DOCS

    tokenizer = load_tokenizer("gpt2")
    chunks, current, chars, nbytes = [], [], 0, 0
    with open(sample, "rb") as f:
        for line in f:
            if nbytes >= raw_mb * 10**6:
                break
            nbytes += len(line)
            current.append(json.loads(line)["text"])
            chars += len(current[-1])
            if len(current) >= CHUNK_DOCS or chars >= CHUNK_CHARS:
                chunks.append(current)
                current, chars = [], 0
    chunks += [current] if current else []
    tokenizer.encode_batch(chunks[0])  # warm up the thread pool
    before, start, tokens = _cpu(resource.RUSAGE_SELF), time.perf_counter(), 0
    for chunk in chunks:
        tokens += sum(map(len, tokenizer.encode_batch(chunk))) + len(chunk)  # + one EOD each
    wall, cpu = time.perf_counter() - start, _cpu(resource.RUSAGE_SELF) - before
    print(json.dumps({"tokens": tokens, "wall": wall, "cpu": cpu}))


def _cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def _pipeline(inputs: list[Path], workers: int, output: Path) -> dict:
    """A fresh ``e2d2 data preprocess`` process: tokens, wall and CPU seconds (main, workers)."""
    command = [sys.executable, str(HERE), "--cli-child", "data", "preprocess", "--input",
               *map(str, inputs), "--tokenizer", "gpt2", "--output", str(output), "--workers",
               str(workers), "--valid-docs", "100", "--overwrite"]
    log_dir = output.with_name(output.name + "-encode")
    shutil.rmtree(log_dir, ignore_errors=True)
    log_dir.mkdir(parents=True)
    env = os.environ | {"TOKENIZERS_PARALLELISM": "false", ENCODE_LOG: str(log_dir)}
    start = time.perf_counter()
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    wall = time.perf_counter() - start
    cpu = json.loads(out.splitlines()[-1])
    manifest = json.loads((output / "manifest.json").read_text())
    tokens = manifest["train"]["tokens"] + manifest["valid"]["tokens"]
    encode = [json.loads(p.read_text()) for p in log_dir.iterdir()]
    return {"tokens": tokens, "wall": wall, **cpu, "encode_wall": sum(e[0] for e in encode),
            "encode_cpu": sum(e[1] for e in encode)}


def _cli_child(args: list[str]) -> None:
    """Run the real command line in this process, then report its CPU use as JSON."""
    from launchers.cli import main

    status = main(args)
    print(json.dumps({"main_cpu": _cpu(resource.RUSAGE_SELF),
                      "worker_cpu": _cpu(resource.RUSAGE_CHILDREN)}))
    sys.exit(status)


ENCODE_LOG = "E2D2_BENCH_ENCODE_LOG"


def _time_encoder(log_dir: Path) -> None:
    """Accumulate the wall and thread-CPU seconds of every ``encode_batch`` call in this
    process into ``log_dir/PID`` (rewritten after each call: pool workers are terminated,
    so an exit hook would never run)."""
    from data_tools.tokenizer import E2D2Tokenizer

    real = E2D2Tokenizer.encode_batch
    totals = [0.0, 0.0]
    path = log_dir / str(os.getpid())

    def encode_batch(self, texts):
        wall, cpu = time.perf_counter(), time.thread_time()
        ids = real(self, texts)
        totals[0] += time.perf_counter() - wall
        totals[1] += time.thread_time() - cpu
        path.write_text(json.dumps(totals))
        return ids

    E2D2Tokenizer.encode_batch = encode_batch


# Runs in the --cli-child process and, since spawned workers import the parent's main script
# as __mp_main__, in every encoder worker it starts.
if os.environ.get(ENCODE_LOG):
    _time_encoder(Path(os.environ[ENCODE_LOG]))


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=300, help="corpus size (1000 for ~1 GB)")
    parser.add_argument("--files", type=int, default=8, help="files of the 'several' input")
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--inputs", nargs="+", default=["one", "several", "zst"],
                        choices=("one", "several", "zst"))
    parser.add_argument("--raw-mb", type=int, default=16, help="text for each raw measurement")
    parser.add_argument("--data-dir", type=Path, default=HERE.parent / "data")
    args = parser.parse_args()

    info = _build(args.data_dir, args.size_mb, args.files)
    data = args.data_dir
    full = {"one": [data / "one.jsonl"], "several": sorted((data / "several").glob("*.jsonl")),
            "zst": [data / "one.jsonl.zst"]}
    small = {"one": [data / "small.jsonl"], "several": [data / "small.jsonl"],
             "zst": [data / "small.jsonl.zst"]}
    print(f"corpus: {info['bytes'] / 1e6:,.0f} MB of JSON lines, {info['documents']:,} documents "
          f"({info['copies']} varied copies of {'+'.join(CORPORA)}); one.jsonl.zst "
          f"{info['zst_bytes'] / 1e6:,.0f} MB; 'several' = {args.files} files; small = first "
          f"{SMALL_MB} MB; {os.cpu_count()} CPU cores; load average at start {_load()}",
          flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for workers in args.workers:
            for name in args.inputs:
                raw = _raw(data / "one.jsonl", workers, args.raw_mb)
                raw1 = raw if workers == 1 else _raw(data / "one.jsonl", 1, args.raw_mb)
                little = _pipeline(small[name], workers, Path(tmp) / "small")
                big = _pipeline(full[name], workers, Path(tmp) / "full")
                tokens = big["tokens"] - little["tokens"]
                wall = big["wall"] - little["wall"]
                marginal = {k: big[k] - little[k] for k in big}
                cpu = marginal["main_cpu"] + marginal["worker_cpu"]
                rate, raw_rate = tokens / wall, raw["tokens"] / raw["wall"]
                raw_cpu_per_token = raw1["cpu"] / raw1["tokens"]
                row = {"input": name, "workers": workers, "tokens": big["tokens"],
                       "wall": big["wall"], "main_cpu": big["main_cpu"],
                       "worker_cpu": big["worker_cpu"], "steady": rate, "raw": raw_rate,
                       "raw1_cpu_rate": 1 / raw_cpu_per_token,
                       "per_core_wall": rate / raw_rate,
                       "per_core_cpu": tokens * raw_cpu_per_token / cpu,
                       "encoder_cpu_share": marginal["encode_cpu"] / cpu,
                       "encoders_busy": marginal["encode_wall"] / (workers * wall),
                       "load": _load()}
                rows.append(row)
                print(json.dumps({k: round(v, 3) if isinstance(v, float) else v
                                  for k, v in row.items()}), flush=True)

    print("\n| input | workers | tokens | wall s | CPU s main + workers | steady tok/s | raw "
          "tok/s (same threads) | per core, wall | per core, CPU | encoder CPU share | "
          "encoders busy | load after |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['input']} | {r['workers']} | {r['tokens'] / 1e6:,.1f} M | {r['wall']:.1f} | "
              f"{r['main_cpu']:.1f} + {r['worker_cpu']:.1f} | {r['steady']:,.0f} | "
              f"{r['raw']:,.0f} | {r['per_core_wall']:.2f} | {r['per_core_cpu']:.2f} | "
              f"{r['encoder_cpu_share']:.2f} | {r['encoders_busy']:.2f} | "
              f"{r['load'].split()[0]} |")
    by = {(r["input"], r["workers"]): r for r in rows}
    for workers in args.workers:
        if ("zst", workers) in by and ("one", workers) in by:
            zst, one = by[("zst", workers)], by[("one", workers)]
            print(f"zst / plain one file, {workers} worker(s): steady tok/s "
                  f"{zst['steady'] / one['steady']:.2f}, CPU per token "
                  f"{one['per_core_cpu'] / zst['per_core_cpu']:.2f}, encoder CPU share "
                  f"{zst['encoder_cpu_share'] / one['encoder_cpu_share']:.2f}")
    print(f"raw 1-thread rate, median over runs: "
          f"{statistics.median(r['raw1_cpu_rate'] for r in rows):,.0f} tok per CPU second; "
          f"load average at end {_load()}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--raw-child"]:
        _raw_child(sys.argv[2], int(sys.argv[3]))
    elif sys.argv[1:2] == ["--cli-child"]:
        _cli_child(sys.argv[2:])
    else:
        main()
