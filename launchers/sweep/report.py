"""``report.md`` of a sweep: what is significant and what is not, in words, then the tables
and the figures. Every statement follows the sweep's noise rules (``analysis``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from launchers.submit import write_text_atomic
from launchers.sweep import analysis
from launchers.sweep.fit import FORMS, Fit


def _fmt(value) -> str:
    if isinstance(value, list):
        return str(len(value))
    if isinstance(value, float):
        if not np.isfinite(value):
            return "-"
        return f"{value:.4g}" if 1e-3 <= abs(value) < 1e5 or value == 0 else f"{value:.3e}"
    if isinstance(value, int) and abs(value) >= 10**5:
        return f"{value:.3e}"
    return "-" if value is None or value == "" else str(value)


def markdown(rows: Sequence[dict], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def fit_table(fits: Sequence[analysis.ScalingFit]) -> str:
    """Identified fits as estimate [95% interval]; the others as "not identified: why"."""
    lines = ["| fit | group | points | parameters (estimate [95% interval]) |",
             "| --- | --- | --- | --- |"]
    for f in fits:
        label = "joint L(N, D)" if f.x == "joint" else f"single: {analysis.FIT_AXES[f.x]}"
        if not f.fit.identified:
            cells = f"**not identified**: {f.fit.reason}"
        else:
            parts = []
            for name in FORMS[f.fit.form]:
                lo, hi = f.fit.ci(name)
                parts.append(f"{name} = {_fmt(f.fit.params[name])} [{_fmt(lo)}, {_fmt(hi)}]")
            cells = "; ".join(parts)
        lines.append(f"| {label} | {f.group} | {f.fit.n} | {cells} |")
    return "\n".join(lines) + "\n"



def _pm(value: float, se: float) -> str:
    return f"{value:.4f} ± {se:.4f}"


def _seed_offsets(points: Sequence[dict]) -> list[str]:
    """How far each seed's runs sit from their points' means, on average over the points:
    an offset shared by every point is noise the comparisons above count in full."""
    seeds = sorted({k for p in points for k in p["seeds"]})
    complete = [p for p in points if sorted(p["seeds"]) == seeds]
    if len(seeds) < 2 or not complete:
        return []
    offsets = {k: np.mean([y - p["valid_nelbo"] for p in complete
                           for s, y in zip(p["seeds"], p["runs"], strict=True) if s == k])
               for k in seeds}
    within = np.mean([np.std([y - p["valid_nelbo"] - offsets[s]
                              for s, y in zip(p["seeds"], p["runs"], strict=True)])
                      for p in complete])
    text = ", ".join(f"seed {k}: {v:+.4f}" for k, v in offsets.items())
    return ["", f"**Seeds**: mean offset of each seed's runs from their points' means ({text}); "
            f"spread left after removing it: {within:.4f}. A run's seed also seeds its "
            "evaluation's noise draws and its data order, so its offset is common to every "
            "point: comparisons and error bars pair the runs by seed (points.csv: "
            "valid_nelbo_paired_se), while the fits' bootstrap counts the offset in full."]


def _findings(points, fits, reduced, validation, optimal, best, baselines, label
              ) -> list[str]:
    z = f"{analysis.Z:g}"
    lines = [f"The response is **{label}** (lower is better). Two numbers differ *beyond noise* when they differ by more than {z} standard "
             "errors of their difference; everything else is a tie. Points run with the same "
             "seeds are compared paired (a seed shifts every point alike, see **Seeds**), "
             "others from their own standard errors. Values are ± one standard error of "
             "the mean over seeds; differences ± their standard error.", ""]
    by_name = {p["point"]: p for p in points}
    for row in best:
        members = [p for p in points if p["groups"]["budget"] == row["group"]
                   and p["baseline"] is None]
        lowest = min(members, key=lambda p: p["valid_nelbo"])
        worse = sorted(p["decoder_layers"] for p in members
                       if str(p["decoder_layers"]) not in row["tied_decoder_layers"].split())
        if row["verdict"] == "winner":
            text = (f"decoder depth {row['best_decoder_layers']} is the best "
                    f"({_pm(lowest['valid_nelbo'], lowest['valid_nelbo_se'])}) and beats every "
                    "other depth beyond noise")
        else:
            text = (f"depths {row['tied_decoder_layers'].replace(' ', ', ')} tie within noise "
                    f"(lowest: depth {lowest['decoder_layers']}, "
                    f"{_pm(lowest['valid_nelbo'], lowest['valid_nelbo_se'])}); no winner")
            if worse:
                text += (f"; depth {worse[0]} is" if len(worse) == 1 else
                         f"; depths {', '.join(map(str, worse))} are") + " worse beyond noise"
        lines.append(f"* **{row['group']}**: {text}.")
    for row in baselines:
        lines.append(f"* **{row['group']}**: {row['baseline']} "
                     f"{row['baseline_valid_nelbo']:.4f} against E2D2's best "
                     f"({by_name[row['e2d2_point']]['point']}) {row['e2d2_valid_nelbo']:.4f}: "
                     f"difference {_pm(row['difference'], row['difference_se'])}: "
                     f"**{row['verdict']}**" + (" (within noise)" if row["verdict"] == "tie"
                                               else " (beyond noise)") + ".")
    identified = [f for f in fits if f.fit.identified]
    lines += ["", f"**Fits**: {len(identified)} of {len(fits)} identified."]
    for f in fits:
        name = "joint L(N, D)" if f.x == "joint" else analysis.FIT_AXES[f.x]
        if f.fit.identified:
            parts = ", ".join(f"{k} {f.fit.params[k]:.3g} [{lo:.3g}, {hi:.3g}]"
                              for k in FORMS[f.fit.form] for lo, hi in [f.fit.ci(k)])
            lines.append(f"* {name} ({f.group}): identified: {parts}.")
        else:
            lines.append(f"* {name} ({f.group}): **not identified** ({f.fit.reason}); no "
                         "curve, no band, no extrapolation.")
    lines += ["", "**Validation (leave-largest-out)**: the joint fit without the points of the "
              "largest training FLOPs, predicting them."]
    if reduced is None or not validation:
        lines.append("* nothing to validate.")
    elif not reduced.identified:
        lines.append(f"* the reduced fit is **not identified** ({reduced.reason}): no "
                     "prediction.")
    else:
        for row in validation:
            verdict = "within" if abs(row["error_in_se"]) <= analysis.Z else "beyond"
            lines.append(f"* {row['point']}: predicted {row['predicted']:.4f} "
                         f"[{row['predicted_ci_low']:.4f}, {row['predicted_ci_high']:.4f}], "
                         f"measured {_pm(row['measured'], row['measured_se'])}: error "
                         f"{row['error']:+.4f} = {row['error_in_se']:+.2f} SE ({verdict} noise).")
    lines += ["", "**Compute-optimal decoder depth** (from the joint fit, among the sweep's "
              "depths; bootstrap 95% interval):"]
    if not optimal:
        lines.append("* not given: the joint fit is not identified.")
    for row in optimal:
        where = "extrapolated" if row["extrapolated"] else "within the sweep"
        if "best_decoder_layers" not in row:
            lines.append(f"* {row['budget_flops']:.3g} FLOPs, {row['objective']}: {row['note']}.")
            continue
        note = f"; {row['note']}" if row["note"] else ""
        lines.append(f"* {row['budget_flops']:.3g} FLOPs ({where}), {row['objective']}: depth "
                     f"{row['best_decoder_layers']} [{row['ci_low']}, {row['ci_high']}] "
                     f"({row['share_of_draws']:.0%} of bootstrap fits agree{note}).")
    lines += _seed_offsets(points)
    spread = [p["sampling_tokens_per_s_sd"] / p["sampling_tokens_per_s"] for p in points
              if np.isfinite(p["sampling_tokens_per_s_sd"])]
    if spread:
        lines += ["", f"**Sampling speed**: measured tokens/s spread (SD / mean) "
                  f"{min(spread):.0%}-{max(spread):.0%} per point. The frontier uses the "
                  "analytic sampling FLOPs per generated token, which has no noise; tokens/s "
                  "measured on a shared machine is noisy and shown with its spread only."]
    return lines


def _two_step(two_step, loss: str) -> list[str]:
    """OLMo's two-step prediction, per accuracy metric (``analysis.two_step``)."""
    lines = ["## Two-step prediction (loss, then task accuracy)\n",
             f"As OLMo's ladder: step 1, the joint fit of {loss} without the largest points "
             "(the leave-largest-out fit above, on that loss); step 2, task accuracy as a "
             "sigmoid of the loss, acc = b + a / (1 + exp(k (L - L0))), fitted over the other "
             "points' runs; chained, the accuracy predicted at each held-out point, with a 95% "
             "bootstrap interval (each step-1 draw through one step-2 draw). *Step 2 alone*: "
             "the sigmoid at the point's measured loss.\n"]
    for name, curve, rows in two_step:
        if curve.identified:
            parts = ", ".join(f"{k} {curve.params[k]:.3g} [{lo:.3g}, {hi:.3g}]"
                              for k in FORMS["sigmoid"] for lo, hi in [curve.ci(k)])
            lines.append(f"* **{name}**: step 2 identified over {curve.n} runs: {parts}.")
        else:
            lines.append(f"* **{name}**: step 2 **not identified** ({curve.reason}): no "
                         "prediction.")
        for row in rows:
            text = f"  * {row['point']}: measured {_pm(row['measured'], row['measured_se'])}"
            if "step2_predicted" in row:
                text += (f"; step 2 alone {row['step2_predicted']:.4f} "
                         f"[{row['step2_ci_low']:.4f}, {row['step2_ci_high']:.4f}]")
            if "predicted" in row:
                verdict = "within" if abs(row["error_in_se"]) <= analysis.Z else "beyond"
                text += (f"; chained (loss {row['predicted_loss']:.4f}) {row['predicted']:.4f} "
                         f"[{row['predicted_ci_low']:.4f}, {row['predicted_ci_high']:.4f}]: "
                         f"error {row['error']:+.4f} = {row['error_in_se']:+.2f} SE ({verdict} "
                         "noise)")
            elif curve.identified:
                text += f"; chained: **not identified** ({row['note']})"
            lines.append(text + ".")
    return lines


def _renamed(key: str) -> str:
    return key.replace("valid_nelbo", "response")


def response_named(rows: Sequence[dict], label: str) -> list[dict]:
    """``rows`` of the comparisons or points, their ``valid_nelbo`` keys named ``response``
    when the response (``label``) is another metric (``collect.response_points``)."""
    if label == analysis.NELBO:
        return list(rows)
    return [{_renamed(k): v for k, v in r.items()} for r in rows]


def _points_table(points: Sequence[dict], columns: Sequence[str], label: str) -> str:
    if label == analysis.NELBO:
        return markdown(points, columns)
    rows = response_named([{c: p.get(c) for c in columns} for p in points], label)
    return f"response: {label}\n\n" + markdown(rows, [_renamed(c) for c in columns])


def write_report(spec, out: Path, points: Sequence[dict], runs: Sequence[dict],
                 missing: Sequence[str], fits, reduced: Fit | None, validation, optimal, best,
                 baselines, images: Sequence[str], label: str = analysis.NELBO,
                 failures: Sequence[str] = (), two_step: Sequence = (),
                 loss: str = "valid_nelbo") -> None:
    columns = ("point", "variant", "decoder_layers", "runs", "train_flops", "valid_nelbo",
               "valid_nelbo_se", "valid_nelbo_eval_se", "sampling_flops_per_token",
               "sampling_tokens_per_s", "sampling_tokens_per_s_sd")
    report = [f"# Sweep {spec.name}\n",
              f"Spec: `{spec.path.name}`; {len(runs)} of {len(spec.points)} runs finished "
              f"({spec.seeds} seed(s) per point), {len(points)} points.\n"]
    if missing:
        report.append("**Not finished (left out)**: " + ", ".join(missing) + "\n")
    if failures:
        report.append("**Evaluations that FAILED** (their metrics are missing for these runs; "
                      "the next collect tries again):\n\n" + "\n".join(f"* {f}" for f in failures)
                      + "\n")
    report += ["## What is significant\n",
               "\n".join(_findings(points, fits, reduced, validation, optimal, best,
                                   baselines, label)) + "\n",
               "## Points\n", _points_table(points, columns, label),
               "## Fits\n", "Single axis: response = E + A·(x/x0)^-alpha per budget, never pooled; "
               "joint: response = E + A·(N/N0)^-alpha + B·(D/D0)^-beta over non-embedding "
               "parameters N and training tokens D. x0, N0, D0: the geometric means of the data "
               "(fits.csv). Huber loss on log residuals, L-BFGS-B from a grid of starts; "
               "intervals: bootstrap over the runs within each point.\n", fit_table(fits),
               "## Best depth per budget\n",
               markdown(best, list(best[0]) if best else ["group"])]
    if baselines:
        report += ["## Baselines\n", markdown(baselines, list(baselines[0]))]
    if two_step:
        report += ["\n".join(_two_step(two_step, loss)) + "\n"]
    report += ["## Figures\n", *[f"![{Path(p).stem}]({p})\n" for p in images]]
    write_text_atomic(out / "report.md", "\n".join(report))
