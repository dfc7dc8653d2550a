"""The sweep's figures (matplotlib, no display), each as PNG and PDF: every point with its
error bar (±2 standard errors, paired by seed where the point ran with every seed: the
error that the comparisons use), one colour per budget group, fitted curves with their 95% bootstrap band only for
identified fits (a fit that is not identified is named in the legend, without a curve).

The response (y) is the validation NELBO, or the metric ``e2d2 sweep collect --metric``
names (an accuracy as its error ``1 - acc``: lower is better on every figure).

* ``fit_<x>``: the response against each single-axis ``x``; baselines as dashed lines with their
  ±2 SE band in their budget's colour;
* ``fit_joint``: the response against training FLOPs per decoder depth, with the joint fit;
* ``pareto_sampling_flops``: the response against the analytic sampling FLOPs per generated token,
  the frontier (points no other beats beyond noise) of each budget joined;
* ``pareto_tokens_per_s``: the response against measured sampling tokens/s, with its spread (±1 SD
  over runs and repeats) as x error bars; no frontier is drawn on a noisy measurement;
* ``two_step_<accuracy>``: step 2 of the two-step prediction (``two_step_plot``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from launchers.sweep.analysis import NELBO, ScalingFit, Z, held_out, pareto, run_pairs
from launchers.sweep.fit import Fit

ERRORBARS = f"error bars ±{Z:g} SE (paired by seed where every seed ran)"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path, stem: str) -> str:
    for suffix in (".pdf", ".png"):
        path = out / f"{stem}{suffix}"
        tmp = path.with_name(f".{stem}.tmp{suffix}")
        fig.savefig(tmp, dpi=150, bbox_inches="tight")
        tmp.replace(path)
    _pyplot().close(fig)
    return f"{stem}.png"


def _colours(points: Sequence[dict]) -> dict[str, str]:
    groups = sorted({p["groups"]["budget"] for p in points},
                    key=lambda g: np.mean([p["train_flops"] for p in points
                                           if p["groups"]["budget"] == g]))
    return {g: f"C{i % 10}" for i, g in enumerate(groups)}


def _log_ticks(values: Sequence[float]) -> list[float]:
    """Round-number ticks within the data's range: 1, 2, 5 per decade, denser when the
    range is narrow; never more than a few, so that labels do not overlap."""
    lo, hi = min(values), max(values)
    for mantissas in ((1, 2, 5), (1, 1.5, 2, 3, 5, 7)):
        ticks = [m * 10.0**e for e in range(int(np.floor(np.log10(lo))), int(np.log10(hi)) + 1)
                 for m in mantissas if lo * 0.97 <= m * 10.0**e <= hi * 1.03]
        if len(ticks) >= 2:
            return ticks if len(ticks) <= 7 else ticks[::int(np.ceil(len(ticks) / 7))]
    return sorted({float(f"{lo:.2g}"), float(f"{hi:.2g}")})


def _compact(value: float, _position=None) -> str:
    """1.5e12 rather than 1.5x10^12 or 1500000000000."""
    if abs(value) < 1e4:
        return f"{value:g}"
    mantissa, exponent = f"{value:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _log_axis(ax, values: Sequence[float], integer: bool = False) -> None:
    """A log x axis with readable ticks: integers (depths) at each value, written as
    integers; other values at round numbers (``_log_ticks``), written compactly."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator, ScalarFormatter

    ax.set_xscale("log")
    ax.xaxis.set_minor_locator(NullLocator())
    if integer:
        ax.xaxis.set_major_locator(FixedLocator(sorted(set(values))))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.ticklabel_format(axis="x", style="plain")
        return
    ax.xaxis.set_major_locator(FixedLocator(_log_ticks(values)))
    ax.xaxis.set_major_formatter(FuncFormatter(_compact))


def _se(point: dict) -> float:
    """The standard error that comparisons use: paired by seed where the point ran with
    every seed (their shared offsets cancel), else its own."""
    paired = point.get("valid_nelbo_paired_se", float("nan"))
    return paired if np.isfinite(paired) else point["valid_nelbo_se"]


def _legend_below(ax) -> None:
    """Under the axes: a legend never hides a point."""
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -0.14), frameon=False)


def _errorbar(ax, points: Sequence[dict], x_key: str, colour: str, label: str | None,
              marker: str = "o", xerr: str | None = None) -> None:
    ax.errorbar([p[x_key] for p in points], [p["valid_nelbo"] for p in points],
                yerr=[Z * _se(p) for p in points],
                xerr=None if xerr is None else [p[xerr] for p in points],
                fmt=marker, color=colour, capsize=3, markersize=5, label=label, zorder=3)


def fit_plot(out: Path, points: Sequence[dict], fits: Sequence[ScalingFit], x_key: str,
             x_label: str, response: str = NELBO) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    colours = _colours(points)
    by_name = {p["point"]: p for p in points}
    xs = [by_name[n][x_key] for f in fits for n in f.points]
    grid = np.geomspace(min(xs), max(xs), 200)  # curves only over the data: no extrapolation
    for i, f in enumerate(fits):
        members = [by_name[n] for n in f.points]
        colour = colours.get(members[0]["groups"]["budget"], f"C{i}") \
            if x_key != "train_flops" else f"C{i % 10}"
        verdict = " — fit, 95% band" if f.fit.identified else \
            f" — not identified: {f.fit.reason}"
        _errorbar(ax, members, x_key, colour, f"{f.group}{verdict}")
        if f.fit.identified:
            ax.plot(grid, f.fit.predict(grid), color=colour, lw=1.2)
            lo, hi = np.percentile(f.fit.predict_draws(grid), [2.5, 97.5], axis=0)
            ax.fill_between(grid, lo, hi, color=colour, alpha=0.2, lw=0)
    if x_key != "train_flops":  # the baselines at each budget, for reference
        for p in (p for p in points if p["baseline"] is not None):
            colour = colours[p["groups"]["budget"]]
            ax.axhline(p["valid_nelbo"], color=colour, ls="--", lw=1)
            ax.axhspan(p["valid_nelbo"] - Z * _se(p), p["valid_nelbo"] + Z * _se(p),
                       color=colour, alpha=0.08)
            ax.annotate(p["baseline"], (0.01, p["valid_nelbo"]), xycoords=("axes fraction",
                        "data"), ha="left", va="bottom", fontsize=7, color=colour)
    _log_axis(ax, xs, integer=x_key == "decoder_layers")
    ax.set_xlabel(x_label)
    ax.set_ylabel(response)
    ax.set_title(f"{response} = E + A·(x/x0)^-alpha over {x_label}\n"
                 f"{ERRORBARS}; bands: 95% bootstrap (identified fits only)", fontsize=9)
    _legend_below(ax)
    return _save(fig, out, f"fit_{x_key}")


def joint_plot(out: Path, points: Sequence[dict], joint: ScalingFit, response: str = NELBO
               ) -> str:
    """NELBO against training FLOPs, one colour per decoder depth; the joint fit's curve of
    each depth over the tokens its points span, with its band, if it is identified."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    members = [p for p in points if p["point"] in joint.points]
    depths = sorted({p["decoder_layers"] for p in members})
    for i, depth in enumerate(depths):
        mine = sorted((p for p in members if p["decoder_layers"] == depth),
                      key=lambda p: p["train_flops"])
        colour = f"C{i % 10}"
        _errorbar(ax, mine, "train_flops", colour, f"decoder layers {depth}")
        if joint.fit.identified and len(mine) > 1:
            tokens = np.geomspace(mine[0]["tokens"], mine[-1]["tokens"], 50)
            x = np.stack([np.full_like(tokens, mine[0]["non_embedding_params"]), tokens], 1)
            cost = tokens * mine[0]["train_flops_per_token"]
            ax.plot(cost, joint.fit.predict(x), color=colour, lw=1.2)
            lo, hi = np.percentile(joint.fit.predict_draws(x), [2.5, 97.5], axis=0)
            ax.fill_between(cost, lo, hi, color=colour, alpha=0.15, lw=0)
    verdict = "identified: curves and 95% bands" if joint.fit.identified else \
        f"not identified: {joint.fit.reason}"
    _log_axis(ax, [p["train_flops"] for p in members])
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel(response)
    ax.set_title(f"joint fit E + A·(N/N0)^-alpha + B·(D/D0)^-beta ({joint.group})\n{verdict}; "
                 f"{ERRORBARS}", fontsize=8)
    _legend_below(ax)
    return _save(fig, out, "fit_joint")


def pareto_plot(out: Path, points: Sequence[dict], x_key: str, x_label: str, stem: str,
                xerr: str | None = None, frontier: bool = True, response: str = NELBO) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    colours = _colours(points)
    for group, colour in colours.items():
        members = sorted((p for p in points if p["groups"]["budget"] == group),
                         key=lambda p: p[x_key])
        _errorbar(ax, [p for p in members if p["baseline"] is None], x_key, colour, group,
                  xerr=xerr)
        _errorbar(ax, [p for p in members if p["baseline"] is not None], x_key, colour, None,
                  marker="s", xerr=xerr)
        for p in members:
            ax.annotate(p["baseline"] or f"d{p['decoder_layers']}", (p[x_key], p["valid_nelbo"]),
                        fontsize=6.5, xytext=(4, 2), textcoords="offset points", color=colour)
        if frontier:
            front = pareto(members, x_key)
            ax.plot([p[x_key] for p in front], [p["valid_nelbo"] for p in front], "-",
                    color=colour, lw=1, alpha=0.7)
    _log_axis(ax, [p[x_key] for p in points])
    ax.set_xlabel(x_label)
    ax.set_ylabel(f"{response} (lower is better)")
    note = "lines: frontier (points no other beats beyond noise)" if frontier else \
        "x error bars: ±1 SD over runs and repeats"
    ax.set_title(f"{ERRORBARS}; squares: baselines\n{note}", fontsize=9)
    _legend_below(ax)
    return _save(fig, out, stem)


def two_step_plot(out: Path, points: Sequence[dict], loss: str, accuracy: str, curve: Fit,
                  rows: Sequence[dict]) -> str:
    """Step 2 of the two-step prediction: every run's accuracy against its loss (the fitted
    points' runs as circles, the held-out ones' as squares), the sigmoid with its 95% band if
    it is identified, and each held-out point's chained prediction (at the predicted loss,
    with its interval)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    held, kept = held_out(points)
    xs = []
    for group, marker, color, label in ((kept, "o", "C0", "fitted runs"),
                                        (held, "s", "C1", "held-out runs")):
        pairs = [pair for p in group for pair in run_pairs(p, loss, accuracy)]
        x, y = zip(*pairs, strict=True) if pairs else ((), ())
        xs += x
        ax.plot(x, y, marker, color=color, ms=4, label=label, alpha=0.8)
    if curve.identified and xs:
        grid = np.linspace(min(xs), max(xs), 200)
        ax.plot(grid, curve.predict(grid), color="C0", lw=1.2)
        lo, hi = np.percentile(curve.predict_draws(grid), [2.5, 97.5], axis=0)
        ax.fill_between(grid, lo, hi, color="C0", alpha=0.2, lw=0)
    chained = [r for r in rows if "predicted" in r]
    if chained:
        ax.errorbar([r["predicted_loss"] for r in chained], [r["predicted"] for r in chained],
                    yerr=[[r["predicted"] - r["predicted_ci_low"] for r in chained],
                          [r["predicted_ci_high"] - r["predicted"] for r in chained]],
                    fmt="D", color="C3", capsize=3, label="chained prediction, 95%")
    verdict = "identified: fit and 95% band" if curve.identified else \
        f"not identified: {curve.reason}"
    ax.set_xlabel(f"{loss} (per run)")
    ax.set_ylabel(accuracy)
    ax.set_title(f"step 2: {accuracy} = b + a / (1 + exp(k ({loss} - L0)))\n{verdict}",
                 fontsize=8)
    _legend_below(ax)
    return _save(fig, out, f"two_step_{accuracy}")


def write_all(out: Path, points: list[dict], fits: list[ScalingFit],
              fit_axes: dict[str, str], response: str = NELBO) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    images = []
    for x, label in fit_axes.items():
        group = [f for f in fits if f.x == x]
        if group:
            images.append(fit_plot(out, points, group, x, label, response))
    joint = [f for f in fits if f.x == "joint"]
    if len(joint) == 1:
        images.append(joint_plot(out, points, joint[0], response))
    images.append(pareto_plot(out, points, "sampling_flops_per_token",
                              "sampling FLOPs per generated token (analytic; lower is better)",
                              "pareto_sampling_flops", response=response))
    images.append(pareto_plot(out, points, "sampling_tokens_per_s",
                              "measured sampling tokens/s (higher is better)",
                              "pareto_tokens_per_s", xerr="sampling_tokens_per_s_sd",
                              frontier=False, response=response))
    return images
