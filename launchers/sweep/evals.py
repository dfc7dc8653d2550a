"""The spec's ``eval`` metrics of each finished run, computed once: ``e2d2 eval --json`` per
corpus and one ``e2d2 lm-eval`` per run for the tasks, as subprocesses (a failure stays in its
run; the commands are the ones a user runs).

Each result is stored in ``RUN/sweep_eval.json`` under a key of the run's checkpoint step and
the evaluation's settings (the corpus's options, ``ema`` and ``overrides``; or the task,
``task_args`` and ``ema``: lm-eval reads the model on one process, so ``overrides`` and
``nproc_per_node`` apply to the corpora only): a second collect reads it, a run trained
further or a changed ``eval`` section evaluates again. ``nproc_per_node`` is not in the key:
every layout gives the same number (docs/eval.md).

Metrics (one column each in the run and point tables, with ``<metric>_eval_se``, the
evaluation's own standard error):

* ``<corpus>_nelbo``: ``e2d2 eval``'s ``nelbo`` and its ``nelbo_std_error`` (between
  sequences, Monte-Carlo noise included); lower is better;
* ``<task>_<metric>`` (``kjv_cloze_acc``; a filter other than lm-eval's ``none`` is appended):
  every numeric metric lm-eval reports for the task, its ``<metric>_stderr`` (NaN where
  lm-eval gives none, as for perplexities), and lm-eval's ``higher_is_better``.

An evaluation that fails is not cached and is reported (the run, what failed, the command's
last error line); the run's metric is NaN and the next collect tries again.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from e2d2.errors import UserError
from launchers.submit import e2d2_command, write_text_atomic
from launchers.sweep.spec import Corpus, EvalSpec, SweepSpec

CACHE_FILE = "sweep_eval.json"


@dataclass(frozen=True)
class Metric:
    name: str
    higher_is_better: bool


VALID_NELBO = Metric("valid_nelbo", False)  # the run's own last validation NELBO


def _key(kind: str, settings: dict, step: int) -> str:
    """A cache key: readable, with a digest of everything that changes the number."""
    text = json.dumps({"kind": kind, "step": step, **settings}, sort_keys=True)
    return f"{kind}:{settings['name']}:step{step}:{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def corpus_key(evals: EvalSpec, corpus: Corpus, step: int) -> str:
    return _key("corpus", asdict(corpus) | {"ema": evals.ema, "overrides": evals.overrides},
                step)


def task_key(evals: EvalSpec, task: str, step: int) -> str:
    return _key("task", {"name": task, "task_args": evals.task_args, "ema": evals.ema}, step)


def read_cache(run_dir: Path) -> dict:
    """The run's stored results; a damaged file (a crash mid-write of an older version, a
    hand edit) counts as empty: its results are computed again and the file rewritten."""
    try:
        cache = json.loads((run_dir / CACHE_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return cache if isinstance(cache, dict) else {}


def _write_cache(run_dir: Path, cache: dict) -> None:
    write_text_atomic(run_dir / CACHE_FILE, json.dumps(cache, indent=1) + "\n")


def check_data(evals: EvalSpec) -> None:
    """Every corpus's data exists (before any evaluation starts)."""
    for corpus in evals.corpora:
        for path in corpus.data:
            if not Path(path).exists() and not any(c in path for c in "*?["):
                raise UserError(f"eval corpus {corpus.name}: data {path} does not exist; fix "
                                "eval.corpora in the spec (paths are relative to the cwd)")


def _run(command: list[str]) -> tuple[bool, str]:
    """(ok, stdout or the last error line) of ``e2d2 COMMAND``."""
    done = subprocess.run([*e2d2_command(), *command], text=True, capture_output=True)
    if done.returncode == 0:
        return True, done.stdout
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    return False, f"exit code {done.returncode}: {lines[-1] if lines else 'no error output'}"


def _eval_corpus(run_dir: Path, evals: EvalSpec, corpus: Corpus) -> tuple[dict | None, str]:
    command = ["eval", str(run_dir), *evals.overrides, "--data", *corpus.data, "--split",
               corpus.split, "--convention", corpus.convention, "--json"]
    for flag, value in (("--draws", corpus.draws), ("--max-sequences", corpus.max_sequences)):
        if value is not None:
            command += [flag, str(value)]
    command += ["--ema"] * evals.ema
    if evals.nproc_per_node > 1:
        command += ["--nproc-per-node", str(evals.nproc_per_node)]
    ok, out = _run(command)
    if not ok:
        return None, out
    record = json.loads(out.strip().splitlines()[-1])
    return {"metrics": {corpus.metric: {"value": record["nelbo"],
                                        "se": record["nelbo_std_error"],
                                        "higher_is_better": False}},
            "record": record}, ""


def _eval_tasks(run_dir: Path, evals: EvalSpec, tasks: list[str]
                ) -> tuple[dict[str, dict] | None, str]:
    args = dict(evals.task_args)
    model_args = f"pretrained={run_dir}" + (",ema=true" if evals.ema else "")
    if "mc_draws" in args:
        model_args += f",mc_draws={args['mc_draws']}"
    tmp = run_dir / ".sweep_lm_eval"
    shutil.rmtree(tmp, ignore_errors=True)
    command = ["lm-eval", "--model_args", model_args, "--tasks", ",".join(tasks),
               "--output_path", str(tmp)]
    for key in ("limit", "num_fewshot", "batch_size", "include_path"):
        if key in args:
            command += [f"--{key}", str(args[key])]
    try:
        ok, out = _run(command)
        if not ok:
            return None, out
        found = sorted(tmp.rglob("results_*.json"))
        if not found:
            return None, f"lm-eval wrote no results under {tmp}"
        output = json.loads(found[-1].read_text())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out_tasks = {}
    for task in tasks:
        if task not in output.get("results", {}):
            return None, f"lm-eval gave no results for task {task}"
        out_tasks[task] = {"metrics": task_metrics(task, output["results"][task],
                                                   output.get("higher_is_better", {}).get(task, {})),
                           "record": {"n_samples": output.get("n-samples", {}).get(task),
                                      "versions": output.get("versions", {}).get(task)}}
    return out_tasks, ""


def task_metrics(task: str, results: dict, higher: dict) -> dict[str, dict]:
    """lm-eval's ``results[task]`` (``"acc,none": 0.3, "acc_stderr,none": 0.02, ...``) as
    ``{"<task>_acc": {"value", "se", "higher_is_better"}}``."""
    out = {}
    for key, value in results.items():
        if "," not in key or "_stderr," in key or not isinstance(value, int | float):
            continue
        metric, filt = key.split(",", 1)
        se = results.get(f"{metric}_stderr,{filt}")
        name = f"{task}_{metric}" + ("" if filt == "none" else f"_{filt}")
        out[name] = {"value": float(value),
                     "se": float(se) if isinstance(se, int | float) else math.nan,
                     "higher_is_better": bool(higher.get(metric, False))}
    return out


def evaluate_runs(spec: SweepSpec, rows: list[dict]) -> tuple[list[Metric], list[str], int]:
    """Add the ``eval`` metrics to each run's row (``<metric>`` and ``<metric>_eval_se``),
    computing what the cache lacks. Returns the metrics, the failures (one line each) and
    how many evaluations ran."""
    evals = spec.evals
    if not evals.enabled or not rows:
        return [], [], 0
    check_data(evals)
    # a corpus's metric is known before it runs: a column even where every run failed
    metrics = {c.metric: Metric(c.metric, False) for c in evals.corpora}
    failures, ran = [], 0
    for row in rows:
        run_dir, step = row["_point"].run_dir, row["steps"]
        cache = read_cache(run_dir)
        results: dict[str, dict] = {}
        for corpus in evals.corpora:
            key = corpus_key(evals, corpus, step)
            if key not in cache:
                ran += 1
                result, error = _eval_corpus(run_dir, evals, corpus)
                if result is None:
                    failures.append(f"{row['run']}: corpus {corpus.name}: e2d2 eval {error}")
                    continue
                cache[key] = result
                _write_cache(run_dir, cache)
            results |= cache[key]["metrics"]
        keys = {task: task_key(evals, task, step) for task in evals.tasks}
        missing = [task for task, key in keys.items() if key not in cache]
        if missing:
            ran += 1
            found, error = _eval_tasks(run_dir, evals, missing)
            if found is None:
                failures.append(f"{row['run']}: tasks {', '.join(missing)}: e2d2 lm-eval {error}")
            else:
                for task, result in found.items():
                    cache[keys[task]] = result
                _write_cache(run_dir, cache)
        for key in keys.values():
            if key in cache:
                results |= cache[key]["metrics"]
        for name, result in results.items():
            metrics.setdefault(name, Metric(name, result["higher_is_better"]))
            row[name], row[f"{name}_eval_se"] = result["value"], result["se"]
    for row in rows:  # a metric a run lacks (its evaluation failed) is NaN, not absent
        for name in metrics:
            row.setdefault(name, math.nan)
            row.setdefault(f"{name}_eval_se", math.nan)
    return list(metrics.values()), failures, ran
