"""``e2d2 sweep collect``: the eval metrics, tables, fits, comparisons, plots and report of a
sweep.

First the spec's ``eval`` metrics of every finished run that lacks them (``evals.py``: run
once, stored in the run directory, evaluated again only for a later step or changed
settings). Writes into ``OUTPUT/results/`` (only runs whose saved config is the spec's
current one: configurations are never mixed):

* ``runs.csv``: one row per finished run (seed): its final validation NELBO and that
  evaluation's standard error, each eval metric ``<m>`` and its ``<m>_eval_se``,
  parameters, tokens, training FLOPs (``e2d2.flops``) and sampling tokens/s (median of the
  benchmark's repeats, and their spread);
* ``points.csv`` / ``points.md``: one row per grid point (or baseline): the mean NELBO over
  its runs and its standard error (within-point variance pooled over the sweep's points:
  each point alone has seeds - 1 degrees of freedom; the evaluation's own standard error
  when every point has one run), its paired standard error against the points run with the
  same seeds (``add_paired_se``), the same four numbers of each eval metric (``<m>``,
  ``<m>_se``, ``<m>_paired_se``, ``<m>_eval_se``), the analytic sampling FLOPs per
  generated token and the measured sampling tokens/s with its spread over runs and repeats;
* ``best_depth.csv``, ``baselines.csv``: the best depth per budget only where it wins
  beyond noise, else the depths that tie; each baseline against E2D2's best;
* ``fits.csv`` / ``fits.json``: the single-axis and joint fits (``fit.py``), each
  identified (estimate and 95% interval) or not (the reason, no numbers);
* ``validation.csv``: leave-largest-out predictions; ``compute_optimal.csv``;
* ``two_step.csv`` / ``two_step_fits.json`` (with an accuracy among the eval metrics):
  OLMo's two-step prediction of each accuracy at the leave-largest-out points
  (``analysis.two_step``) and the step-2 sigmoid fits;
* PNG and PDF plots (``plots.py``) and ``report.md``, which says what is significant.

The comparisons, fits and figures are of one *response*: the validation NELBO, or the
metric ``--metric`` names (``response_points``; an accuracy as its error ``1 - acc``, so
that lower is better everywhere); their tables then name it ``response``.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence

import numpy as np

from e2d2 import flops
from e2d2.errors import UserError
from launchers.submit import write_text_atomic
from launchers.sweep import analysis, plots
from launchers.sweep.bench import NEW_BLOCKS, PROMPT_BLOCKS, RESULT_FILE
from launchers.sweep.evals import VALID_NELBO, Metric, evaluate_runs
from launchers.sweep.fit import FORMS
from launchers.sweep.report import markdown, response_named, write_report
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
TWO_STEP_COLUMNS = ("point", "metric", "loss_metric", "measured", "measured_se", "measured_loss",
                    "step2_predicted", "step2_ci_low", "step2_ci_high", "predicted_loss",
                    "predicted", "predicted_ci_low", "predicted_ci_high", "error",
                    "error_in_se", "note")


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


def point_rows(runs: Sequence[dict], metrics: Sequence[str] = ()) -> list[dict]:
    """One row per point over its runs (module docstring), in grid order. Each point keeps
    its runs' values of every metric (``samples``: seed, value, the evaluation's standard
    error); its response keys hold the validation NELBO (``response_points``)."""
    by_point: dict[str, list[dict]] = {}
    for run in runs:
        by_point.setdefault(run["point"], []).append(run)
    points = []
    for name, members in by_point.items():
        first = members[0]["_point"]
        cfg, summary = first.config.model, members[0]["_summary"]
        repeats = [v for r in members for v in r["_repeats"]]
        values = first.values
        others = [a for a in AXES if a != "decoder_layers"]
        points.append({
            "point": name, "baseline": first.baseline,
            "variant": first.baseline or cfg.variant,
            "decoder_layers": values.get("decoder_layers"), "encoder_layers": cfg.num_layers,
            "hidden_size": cfg.hidden_size, "block_size": cfg.block_size,
            "samples": {m: [(r["seed"], r[m], r[f"{m}_eval_se"]) for r in members]
                        for m in ("valid_nelbo", *metrics)},
            "steps": summary["step"], "tokens": float(np.mean([r["tokens"] for r in members])),
            "params": summary["params"], "non_embedding_params": summary["non_embedding_params"],
            "train_flops": float(np.mean([r["train_flops"] for r in members])),
            "train_flops_per_token": summary["train_flops"] / summary["tokens"],
            "sampling_flops_per_token": sampling_flops_per_token(first),
            "sampling_tokens_per_s": float(np.mean(repeats)),
            "sampling_tokens_per_s_sd": float(np.std(repeats, ddof=1)) if len(repeats) > 1
            else float("nan"),
            "groups": {"budget": _label(values, others),
                       "flops_axis": _label(values, [a for a in AXES if a not in BUDGET_AXES]),
                       "joint": _label(values, [a for a in others if a not in BUDGET_AXES])},
        })
    _set_response(points, [p["samples"]["valid_nelbo"] for p in points])
    return points


def response_points(points: Sequence[dict], metric: Metric) -> list[dict]:
    """Copies of ``points`` whose response keys (``valid_nelbo``, ``valid_nelbo_se``,
    ``valid_nelbo_paired_se``, ``valid_nelbo_eval_se``, ``runs``, ``seeds``: what
    ``analysis``, ``plots`` and ``report`` read) hold ``metric`` over the runs where it is
    known; points without a value are left out. Every analysis takes lower as better: a
    higher-is-better metric in [0, 1] (an accuracy) becomes its error ``1 - value`` (same
    standard errors); another higher-is-better metric has no such form (an error)."""
    samples = [[(s, v, e) for s, v, e in p["samples"][metric.name] if np.isfinite(v)]
               for p in points]
    kept = [(dict(p), mine) for p, mine in zip(points, samples, strict=True) if mine]
    if metric.higher_is_better:
        values = [v for _, mine in kept for _, v, _ in mine]
        if values and not _fractions(values):
            raise UserError(f"--metric {metric.name} is higher-is-better and not within "
                            "[0, 1]: it has no lower-is-better form (1 - value) to fit; "
                            "choose a loss or an accuracy")
        kept = [(p, [(s, 1 - v, e) for s, v, e in mine]) for p, mine in kept]
    out = [p for p, _ in kept]
    _set_response(out, [mine for _, mine in kept])
    return out


def _set_response(points: list[dict], samples: list[list[tuple]]) -> None:
    """The response keys of each point from its runs' ``(seed, value, eval_se)``: the mean
    and its standard error, from the within-point variance pooled over the points (each
    alone has seeds - 1 degrees of freedom; the evaluations' own standard error when every
    point has one run), and the paired one (``add_paired_se``)."""
    spreads = [(len(s) - 1, np.var([v for _, v, _ in s], ddof=1)) for s in samples if len(s) > 1]
    dof = sum(d for d, _ in spreads)
    pooled = sum(d * v for d, v in spreads) / dof if dof else 0.0
    for p, mine in zip(points, samples, strict=True):
        values = [v for _, v, _ in mine]
        eval_se = float(np.mean([e for _, _, e in mine]))
        p |= {"runs": values, "seeds": [s for s, _, _ in mine],
              "valid_nelbo": float(np.mean(values)),
              "valid_nelbo_se": float(np.sqrt(pooled / len(values))) if pooled > 0 else eval_se,
              "valid_nelbo_eval_se": eval_se}
    add_paired_se(points)


def metric_columns(points: list[dict], metrics: Sequence[Metric]) -> list[str]:
    """Add each eval metric's mean and standard errors to ``points`` as it is (an accuracy
    stays an accuracy): ``<m>``, ``<m>_se``, ``<m>_paired_se``, ``<m>_eval_se``."""
    columns = []
    for metric in metrics:
        view = {p["point"]: p for p in response_points(points, Metric(metric.name, False))}
        suffixes = ("", "_se", "_paired_se", "_eval_se")
        for p in points:
            mine = view.get(p["point"], {})
            p |= {f"{metric.name}{s}": mine.get(f"valid_nelbo{s}", float("nan"))
                  for s in suffixes}
        columns += [f"{metric.name}{s}" for s in suffixes]
    return columns


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
    if len(complete) < 2 or dof < 1:
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


def _named(rows: Sequence[dict], label: str) -> str:
    """A table of the comparisons (``report.response_named``)."""
    rows = response_named(rows, label)
    return _csv(rows, list(rows[0]) if rows else ["group"])


def is_accuracy(metric: Metric, runs: Sequence[dict]) -> bool:
    """Higher is better and every run's value is within [0, 1]: step 2 of the two-step
    prediction applies."""
    values = [r[metric.name] for r in runs if np.isfinite(r[metric.name])]
    return metric.higher_is_better and bool(values) and _fractions(values)


def _fractions(values: Sequence[float]) -> bool:
    """Whether every value lies in [0, 1]: a higher-is-better metric so bounded is an
    accuracy, analysed as its error ``1 - value``."""
    return 0 <= min(values) <= max(values) <= 1


def choose_metric(name: str, metrics: Sequence[Metric]) -> Metric:
    known = {m.name: m for m in (VALID_NELBO, *metrics)}
    if name not in known:
        raise UserError(f"--metric {name}: not a metric of this sweep; choose one of "
                        f"{sorted(known)} (eval metrics come from the spec's eval section)")
    return known[name]


def check_metric_name(spec: SweepSpec, name: str) -> None:
    """Refuse a ``--metric`` no evaluation of the spec can give, before evaluating: a task's
    metrics are known only from lm-eval's results (``choose_metric`` checks them after)."""
    corpora = [c.metric for c in spec.evals.corpora]
    if name not in (VALID_NELBO.name, *corpora) and not any(
            name.startswith(f"{task}_") for task in spec.evals.tasks):
        raise UserError(f"--metric {name}: not a metric of this sweep; choose valid_nelbo, a "
                        f"corpus's {corpora or '<corpus>_nelbo'} or a task's <task>_<metric> "
                        f"(tasks: {list(spec.evals.tasks)}) from the spec's eval section")


def collect(spec: SweepSpec, draws: int = 1000,
            metric: str = "valid_nelbo") -> tuple[str, list[str]]:
    """Write the results (module docstring); return a one-line summary and the evaluations
    that failed (``e2d2 sweep collect`` then exits 1: a script sees it)."""
    out = spec.results_dir
    check_metric_name(spec, metric)
    runs, missing = run_rows(spec)
    if not runs:
        return f"sweep {spec.name}: no finished run yet; not done: {', '.join(missing)}", []
    metrics, failures, ran = evaluate_runs(spec, runs)
    response = choose_metric(metric, metrics)
    label = response_label(response)
    base = point_rows(runs, [m.name for m in metrics])
    extra = metric_columns(base, metrics)
    points = response_points(base, response)
    if not points:
        raise UserError(f"--metric {response.name}: no run has a value (its evaluations "
                        f"failed: {'; '.join(failures)}); fix them or choose another metric")
    fits = analysis.fit_all(points, draws)
    reduced, validation = analysis.validate(points, draws)
    loss = VALID_NELBO if response.higher_is_better else response
    reduced_loss = reduced if loss is response else analysis.validate(base, draws)[0]
    two_step = [(m.name, *analysis.two_step(base, loss.name, m.name, reduced_loss, draws))
                for m in metrics if is_accuracy(m, runs)]
    joint = [f for f in fits if f.x == "joint"]
    # the sweep's smallest, middle and largest training FLOPs, and two beyond it
    spent = [p["train_flops"] for p in points if p["baseline"] is None]
    budgets = [float(f"{b:.3g}") for b in np.unique(np.quantile(spent, [0, 0.5, 1]))] \
        if spent else []
    budgets += [budgets[-1] * 4, budgets[-1] * 16] if budgets else []
    optimal = analysis.compute_optimal(points, joint[0].fit, budgets, spec.sampling_tokens) \
        if len(joint) == 1 else []
    best = analysis.best_depth(points)
    baselines = analysis.baseline_comparison(points)
    fit_rows = _fit_rows(fits)
    fit_columns = ["x", "group", "points", "form", "n", "identified", "reason",
                   "bootstrap_draws", "x0_0", "x0_1",
                   *[f"{p}{s}" for p in FORMS["joint"] for s in ("", "_ci_low", "_ci_high")]]
    run_columns = [*RUN_COLUMNS, *[c for m in metrics for c in (m.name, f"{m.name}_eval_se")]]
    step2 = [{"metric": name, "loss_metric": loss.name} | curve.as_dict()
             for name, curve, _ in two_step]
    files = {
        "runs.csv": _csv(runs, run_columns), "points.csv": _csv(base, [*POINT_COLUMNS, *extra]),
        "points.md": markdown(base, [*POINT_COLUMNS, *extra]),
        "fits.csv": _csv(fit_rows, fit_columns),
        "fits.json": json.dumps(fit_rows, indent=2) + "\n",
        "best_depth.csv": _named(best, label),
        "baselines.csv": _named(baselines, label),
        "validation.csv": _csv(validation, ["point", "train_flops", "measured", "measured_se",
                                            "predicted", "predicted_ci_low",
                                            "predicted_ci_high", "error", "error_in_se"]),
        "compute_optimal.csv": _csv(optimal, ["budget_flops", "objective", "extrapolated",
                                              "best_decoder_layers", "ci_low", "ci_high",
                                              "share_of_draws", "note"]),
    }
    if two_step:
        files["two_step.csv"] = _csv([r for *_, rows in two_step for r in rows],
                                     TWO_STEP_COLUMNS)
        files["two_step_fits.json"] = json.dumps(step2, indent=2) + "\n"
    for name, text in files.items():
        write_text_atomic(out / name, text)
    images = plots.write_all(out, points, fits, analysis.FIT_AXES, label)
    images += [plots.two_step_plot(out, base, loss.name, name, curve, rows)
               for name, curve, rows in two_step]
    write_report(spec, out, points, runs, missing, fits, reduced, validation, optimal, best,
                 baselines, images, label=label, failures=failures, two_step=two_step,
                 loss=loss.name)
    identified = sum(f.fit.identified for f in fits)
    failed = f"; {len(failures)} evaluation(s) FAILED (see report.md): " + "; ".join(failures) \
        if failures else ""
    evaluated = f", {ran} evaluation(s) run" if metrics or failures else ""
    return (f"sweep {spec.name}: {len(runs)}/{len(spec.points)} runs, {len(points)} points, "
            f"response {label}, {identified}/{len(fits)} fits identified{evaluated}; report "
            f"{out / 'report.md'}{failed}"), failures


def response_label(metric: Metric) -> str:
    if metric is VALID_NELBO:
        return analysis.NELBO
    return f"1 - {metric.name} (error)" if metric.higher_is_better else metric.name
