"""Shared pieces of the CPU benchmarks: a quiet allocator, model configs, interleaved timing.

Timing on a small shared CPU is noisy. Three things make the ratios trustworthy:

* glibc's allocator returns large buffers to the OS (munmap) and maps them again at every
  step; that churn alone moved one step between 268 and 455 ms. Raising the mmap and trim
  thresholds to 16 GiB keeps freed memory in the heap (about +/-3%). glibc reads them once at
  start-up, so `quiet_malloc` re-executes the script with them set.
* Warm-up steps, then the median of many.
* Variants are timed *interleaved* (one step of each per round), so load from other
  processes shifts every variant alike instead of biasing whichever ran during it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from e2d2.config import ModelConfig

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "17179869184", "MALLOC_TRIM_THRESHOLD_": "17179869184"}


def _malloc_is_quiet() -> bool:
    return all(os.environ.get(k) == v for k, v in MALLOC_ENV.items())


def quiet_malloc() -> None:
    """Re-execute this process with glibc's mmap/trim thresholds at 16 GiB, unless already set."""
    if _malloc_is_quiet():
        return
    # orig_argv keeps "-m benchmarks.x", so the re-executed process imports the same way.
    os.execve(sys.executable, sys.orig_argv, {**os.environ, **MALLOC_ENV})


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Model size flags shared by the benchmarks (defaults: matmul-dominated, < 1 s per step)."""
    g = parser.add_argument_group("model")
    g.add_argument("--hidden", type=int, default=256)
    g.add_argument("--heads", type=int, default=4)
    g.add_argument("--kv-heads", type=int, default=2)
    g.add_argument("--vocab", type=int, default=4096)
    g.add_argument("--layers", type=int, default=6, help="BD3-LM / MDLM depth = E2D2 encoder + decoder")
    g.add_argument("--dec-layers", type=int, default=2, help="E2D2 decoder depth")
    g.add_argument("--block", type=int, default=4)
    g.add_argument("--threads", type=int, default=2)


def model_config(args: argparse.Namespace, variant: str, layers: int, seq_length: int) -> ModelConfig:
    """``layers`` is the total depth; E2D2 splits it into ``layers - dec_layers`` + ``dec_layers``."""
    dec = args.dec_layers if variant.startswith("e2d2") else 0
    return ModelConfig(
        variant=variant, vocab_size=args.vocab, mask_token_id=args.vocab - 1,
        hidden_size=args.hidden, ffn_hidden_size=3 * args.hidden,  # Qwen3's MLP ratio
        num_attention_heads=args.heads, num_query_groups=args.kv_heads,
        num_layers=layers - dec, num_decoder_layers=dec,
        seq_length=seq_length, block_size=args.block,
    )


def e2d2_training_inputs(args: argparse.Namespace):
    """The E2D2 model, training settings, objective and one noised batch the engine
    benchmarks time a step on: ``(cfg, train, objective, x0, batch)``."""
    from e2d2.config import DiffusionConfig, TrainConfig
    from e2d2.diffusion import DiffusionObjective
    from megatron_ext.objective import noised_batch

    cfg = model_config(args, "e2d2", args.layers, args.seq_len)
    train = TrainConfig(steps=1000, batch_size=args.batch, warmup_steps=0, lr=1e-4)
    objective = DiffusionObjective(cfg, DiffusionConfig())
    x0 = torch.randint(0, cfg.vocab_size - 1, (args.batch, cfg.seq_length),
                       generator=torch.Generator().manual_seed(0))
    batch = noised_batch(objective, x0, generator=torch.Generator().manual_seed(1))
    return cfg, train, objective, x0, batch


def kjv_bytes_dataset(root: Path) -> Path:
    """The embedded KJV corpus, bytes-tokenized (260 ids, ``[MASK]`` = 259) by ``e2d2 data``
    into ``root / "data"``: a dataset any machine can build offline in seconds."""
    from launchers.cli import main as e2d2

    corpus, data = root / "kjv.jsonl", root / "data"
    for argv in (["data", "corpus", "kjv", "--output", str(corpus)],
                 ["data", "preprocess", "--input", str(corpus), "--tokenizer", "bytes",
                  "--output", str(data)]):
        if e2d2(argv) != 0:
            raise RuntimeError(f"e2d2 {' '.join(argv)} failed")
    return data


def pretrain_tokens_per_s(cfg: ModelConfig, data: Path, run_dir: Path, steps: int, batch: int,
                          train: dict | None = None, cpu: bool = True,
                          timeout_s: float = 900) -> list[float]:
    """``e2d2 pretrain`` of ``cfg`` for ``steps`` steps of ``batch`` sequences, one process (a
    child, so that it makes its own world of one): the tokens/s of every step.

    ``train``: more ``train`` settings (``precision``, ``micro_batch_size``); ``cpu``: hide
    any GPU from the run. No evaluation but the run's first and last, no checkpoint but the
    last, no TensorBoard."""
    config = {"model": dataclasses.asdict(cfg),  # every field, as a run directory saves it
              "train": {"steps": steps, "batch_size": batch, "warmup_steps": 1,
                        "eval_every": 10**6, "eval_batches": 1, "eval_draws": 1, **(train or {})},
              "checkpoint": {"interval": 10**6}, "log": {"tensorboard": False},
              "run": {"dir": str(run_dir)}, "data": {"path": str(data)}}
    path = run_dir.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(config))
    # A world of one in this process must not make the child join it.
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    done = subprocess.run([sys.executable, "-m", "launchers.cli", "pretrain", str(path)],
                          capture_output=True, text=True, env=env, timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"e2d2 pretrain {path} exited {done.returncode}:\n{done.stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    return [r["tokens_per_s"] for r in records if "tokens_per_s" in r]


def setup(args: argparse.Namespace) -> None:
    quiet_malloc()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)


def interleaved_times(
    steps: dict[str, Callable[[], object]], warmup: int, repeats: int,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Run each callable ``warmup`` times, then ``repeats`` rounds of one call each: ``{name:
    seconds of each round}`` (round ``i`` of every name ran back to back: pair them for ratios).

    ``clock``: wall time by default; ``time.process_time`` counts only this process's CPU
    time, which other jobs preempting it do not inflate (faithful with one thread: more
    threads add their spin-waits)."""
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            t0 = clock()
            fn()
            times[name].append(clock() - t0)
    return times


def median_spread(values: list[float]) -> tuple[float, float]:
    """(median, (p90 - p10) / median)."""
    med = statistics.median(values)
    deciles = statistics.quantiles(values, n=10) if len(values) > 1 else [med] * 9
    return med, (deciles[-1] - deciles[0]) / med


def paired_ratio(rounds: dict[str, list[float]], name: str, base: str) -> tuple[float, float]:
    """(median over rounds of ``name``'s time / ``base``'s in the same round, its spread) for
    `interleaved_times` rounds: pairing by round cancels the load drifting between rounds,
    which a ratio of the two medians keeps."""
    return median_spread([t / b for t, b in zip(rounds[name], rounds[base], strict=True)])


def interleaved_medians(
    steps: dict[str, Callable[[], object]], warmup: int, repeats: int
) -> dict[str, tuple[float, float]]:
    """`interleaved_times` as ``{name: (median seconds, spread)}``, spread = (p90 - p10) / median."""
    return {name: median_spread(ts) for name, ts in interleaved_times(steps, warmup, repeats).items()}


def environment_line(args: argparse.Namespace) -> str:
    """What the numbers were measured on: torch, threads, allocator setting, machine load."""
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    malloc = "16 GiB" if _malloc_is_quiet() else "default"
    line = (f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus, "
            f"malloc thresholds {malloc}, load average {load}")
    if os.getloadavg()[0] > (os.cpu_count() or 1):
        # Oversubscribed cores preempt OpenMP workers mid-op; every multi-threaded op then waits.
        line += ("\nWARNING: the machine is busier than its cores; times are inflated and noisy "
                 "(with several threads, badly: try --threads 1)")
    return line


def table(headers: list[str], rows: list[list[str]]) -> str:
    """A plain aligned text table (also valid Markdown)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), rule, *map(line, rows)])
