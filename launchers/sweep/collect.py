"""``e2d2 sweep collect``: the tables, fits, comparisons, plots and report of a sweep.

Writes into ``OUTPUT/results/`` (only runs whose saved config is the spec's current one:
configurations are never mixed):

* ``runs.csv``: one row per finished run (seed): its final validation NELBO and that
  evaluation's standard error, parameters, tokens, training FLOPs (``e2d2.flops``) and
  sampling tokens/s (median of the benchmark's repeats, and their spread);
* ``points.csv`` / ``points.md``: one row per grid point (or baseline): the mean NELBO over
  its runs and its standard error (within-point variance pooled over the sweep's points:
  each point alone has seeds - 1 degrees of freedom; the evaluation's own standard error
  when every point has one run), its paired standard error against the points run with the
  same seeds (``add_paired_se``), the analytic sampling FLOPs per generated token and the
  measured sampling tokens/s with its spread over runs and repeats;
* ``best_depth.csv``, ``baselines.csv``: the best depth per budget only where it wins
  beyond noise, else the depths that tie; each baseline against E2D2's best;
* ``fits.csv`` / ``fits.json``: the single-axis and joint fits (``fit.py``), each
  identified (estimate and 95% interval) or not (the reason, no numbers);
* ``validation.csv``: leave-largest-out predictions; ``compute_optimal.csv``;
* PNG and PDF plots (``plots.py``) and ``report.md``, which says what is significant.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence

import numpy as np

from e2d2 import flops
from launchers.submit import write_text_atomic
from launchers.sweep import analysis, plots
from launchers.sweep.bench import NEW_BLOCKS, PROMPT_BLOCKS, RESULT_FILE
from launchers.sweep.fit import FORMS
from launchers.sweep.report import markdown, write_report
from launchers.sweep.spec import AXES, BUDGET_AXES, Point, SweepSpec
from launchers.sweep.status import SUMMARY_FILE, sweep_status

RUN_COLUMNS = ("run", "point", "seed", "variant", "decoder_layers", "steps", "tokens",
               "train_flops", "valid_nelbo", "valid_nelbo_eval_se", "sampling_tokens_per_s",
               "sampling_tokens_per_s_sd")
POINT_COLUMNS = ("point", "variant", "decoder_layers", "encoder_layers", "hidden_size",
                 "block_size", "runs", "steps", "tokens", "params", "non_embedding_params",
                 "train_flops", "valid_nelbo", "valid_nelbo_se", "valid_nelbo_paired_se",
                 "valid_nelbo_eval_se",
                 "sampling_flops_per_token", "sampling_tokens_per_s", "sampling_tokens_per_s_sd")


def sampling_flops_per_token(point: Point) -> float:
    """Analytic FLOPs per generated token of the benchmark's sampling (no noise)."""
    cfg = point.config.model
    prompt = PROMPT_BLOCKS * cfg.block_size
    new = min(NEW_BLOCKS * cfg.block_size, cfg.seq_length - prompt)
    return flops.sampling_flops_per_token(cfg, prompt, new, cfg.block_size).masked


def run_rows(spec: SweepSpec) -> tuple[list[dict], list[str]]:
    """One row per done run, and the names of the runs that are not done (and why)."""
    rows, missing = [], []
    for status in sweep_status(spec):
        point = status.point
        if status.state != "done":
            missing.append(f"{point.name} ({status.state}: {status.detail})")
            continue
        summary = json.loads((point.run_dir / SUMMARY_FILE).read_text())
        sampling = json.loads((point.run_dir / RESULT_FILE).read_text())
        repeats = sampling.get("tokens_per_s_repeats", [sampling["tokens_per_s"]])
        rows.append({
            "run": point.name, "point": point.point, "seed": point.config.run.seed,
            "variant": point.config.model.variant,
            "decoder_layers": point.values.get("decoder_layers", ""),
            "steps": summary["step"], "tokens": summary["tokens"],
            "train_flops": summary["train_flops"], "valid_nelbo": summary["nelbo"],
            "valid_nelbo_eval_se": summary.get("nelbo_std_error", float("nan")),
            "sampling_tokens_per_s": sampling["tokens_per_s"],
            "sampling_tokens_per_s_sd": float(np.std(repeats, ddof=1)) if len(repeats) > 1
            else float("nan"),
            "_repeats": repeats, "_summary": summary, "_point": point,
        })
    return rows, missing


def _label(values: dict, axes) -> str:
    def value(v: int) -> str:  # budgets: 1.5e12 rather than 1500000000000
        return str(v) if v < 10**6 else f"{v:.3g}".replace("e+", "e")

    return ", ".join(f"{a}={value(values[a])}" for a in axes if a in values) or "all"


def point_rows(runs: Sequence[dict]) -> list[dict]:
    """One row per point over its runs (module docstring), in grid order."""
    by_point: dict[str, list[dict]] = {}
    for run in runs:
        by_point.setdefault(run["point"], []).append(run)
    spreads = [(len(r) - 1, np.var([x["valid_nelbo"] for x in r], ddof=1))
               for r in by_point.values() if len(r) > 1]
    dof = sum(d for d, _ in spreads)
    pooled = sum(d * v for d, v in spreads) / dof if dof else 0.0
    points = []
    for name, members in by_point.items():
        first = members[0]["_point"]
        cfg, summary = first.config.model, members[0]["_summary"]
        nelbos = [r["valid_nelbo"] for r in members]
        eval_se = float(np.mean([r["valid_nelbo_eval_se"] for r in members]))
        repeats = [v for r in members for v in r["_repeats"]]
        values = first.values
        others = [a for a in AXES if a != "decoder_layers"]
        points.append({
            "point": name, "baseline": first.baseline,
            "variant": first.baseline or cfg.variant,
            "decoder_layers": values.get("decoder_layers"), "encoder_layers": cfg.num_layers,
            "hidden_size": cfg.hidden_size, "block_size": cfg.block_size, "runs": nelbos,
            "seeds": [r["seed"] for r in members],
            "steps": summary["step"], "tokens": float(np.mean([r["tokens"] for r in members])),
            "params": summary["params"], "non_embedding_params": summary["non_embedding_params"],
            "train_flops": float(np.mean([r["train_flops"] for r in members])),
            "train_flops_per_token": summary["train_flops"] / summary["tokens"],
            "valid_nelbo": float(np.mean(nelbos)),
            "valid_nelbo_se": float(np.sqrt(pooled / len(nelbos))) if pooled > 0 else eval_se,
            "valid_nelbo_eval_se": eval_se,
            "sampling_flops_per_token": sampling_flops_per_token(first),
            "sampling_tokens_per_s": float(np.mean(repeats)),
            "sampling_tokens_per_s_sd": float(np.std(repeats, ddof=1)) if len(repeats) > 1
            else float("nan"),
            "groups": {"budget": _label(values, others),
                       "flops_axis": _label(values, [a for a in AXES if a not in BUDGET_AXES]),
                       "joint": _label(values, [a for a in others if a not in BUDGET_AXES])},
        })
    add_paired_se(points)
    return points


def add_paired_se(points: list[dict]) -> None:
    """``valid_nelbo_paired_se`` of the points run with every seed: runs of one seed share
    their evaluation's noise draws and data order, so seed k shifts every point alike. With
    ``nelbo[p, k] = mu[p] + s[k] + e`` (a randomized block design), the standard error of a
    difference of two such points is ``sigma sqrt(2 / K)``: each gets ``sigma / sqrt(K)``,
    sigma from the residuals over ``(P - 1)(K - 1)`` degrees of freedom."""
    seeds = sorted({k for p in points for k in p["seeds"]})
    complete = [p for p in points if sorted(p["seeds"]) == seeds]
    dof = (len(complete) - 1) * (len(seeds) - 1)
    for p in points:
        p["valid_nelbo_paired_se"] = float("nan")
    if dof < 1:
        return
    table = np.array([[dict(zip(p["seeds"], p["runs"], strict=True))[k] for k in seeds]
                      for p in complete])  # [P, K]
    resid = table - table.mean(1, keepdims=True) - table.mean(0, keepdims=True) + table.mean()
    sigma = float(np.sqrt((resid**2).sum() / dof))
    for p in complete:
        p["valid_nelbo_paired_se"] = sigma / np.sqrt(len(seeds))


def _csv(rows: Sequence[dict], columns: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore",
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows([{c: _cell(r.get(c, "")) for c in columns} for r in rows])
    return buffer.getvalue()


def _cell(value):
    if isinstance(value, list):
        return len(value)
    return "" if value is None else value


def _fit_rows(fits: Sequence[analysis.ScalingFit]) -> list[dict]:
    return [{"x": f.x, "group": f.group, "points": " ".join(f.points)} | f.fit.as_dict()
            for f in fits]


def collect(spec: SweepSpec, draws: int = 1000) -> str:
    """Write the results (module docstring); return a one-line summary."""
    out = spec.results_dir
    runs, missing = run_rows(spec)
    if not runs:
        return f"sweep {spec.name}: no finished run yet; not done: {', '.join(missing)}"
    points = point_rows(runs)
    fits = analysis.fit_all(points, draws)
    reduced, validation = analysis.validate(points, draws)
    joint = [f for f in fits if f.x == "joint"]
    # the sweep's smallest, middle and largest training FLOPs, and two beyond it
    spent = [p["train_flops"] for p in points if p["baseline"] is None]
    budgets = [float(f"{b:.3g}") for b in np.unique(np.quantile(spent, [0, 0.5, 1]))]
    budgets += [budgets[-1] * 4, budgets[-1] * 16]
    optimal = analysis.compute_optimal(points, joint[0].fit, budgets, spec.sampling_tokens) \
        if len(joint) == 1 else []
    best = analysis.best_depth(points)
    baselines = analysis.baseline_comparison(points)
    fit_rows = _fit_rows(fits)
    fit_columns = ["x", "group", "points", "form", "n", "identified", "reason",
                   "bootstrap_draws", "x0_0", "x0_1",
                   *[f"{p}{s}" for p in FORMS["joint"] for s in ("", "_ci_low", "_ci_high")]]
    files = {
        "runs.csv": _csv(runs, RUN_COLUMNS), "points.csv": _csv(points, POINT_COLUMNS),
        "points.md": markdown(points, POINT_COLUMNS), "fits.csv": _csv(fit_rows, fit_columns),
        "fits.json": json.dumps(fit_rows, indent=2) + "\n",
        "best_depth.csv": _csv(best, list(best[0]) if best else ["group"]),
        "baselines.csv": _csv(baselines, list(baselines[0]) if baselines else ["group"]),
        "validation.csv": _csv(validation, ["point", "train_flops", "measured", "measured_se",
                                            "predicted", "predicted_ci_low",
                                            "predicted_ci_high", "error", "error_in_se"]),
        "compute_optimal.csv": _csv(optimal, ["budget_flops", "objective", "extrapolated",
                                              "best_decoder_layers", "ci_low", "ci_high",
                                              "share_of_draws", "note"]),
    }
    for name, text in files.items():
        write_text_atomic(out / name, text)
    images = plots.write_all(out, points, fits, analysis.FIT_AXES)
    write_report(spec, out, points, runs, missing, fits, reduced, validation, optimal, best,
                 baselines, images)
    identified = sum(f.fit.identified for f in fits)
    return (f"sweep {spec.name}: {len(runs)}/{len(spec.points)} runs, {len(points)} points, "
            f"{identified}/{len(fits)} fits identified; report {out / 'report.md'}")

