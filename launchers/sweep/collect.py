"""``e2d2 sweep collect``: tables, scaling-law fits, Pareto frontiers and plots of a sweep.

Writes into ``OUTPUT/results/``:

* ``points.csv`` / ``points.md``: every finished point: its grid values and model shape,
  parameters (total and non-embedding), training tokens and FLOPs (``summary.json`` of
  ``e2d2 pretrain``, counted with ``e2d2.flops``), final validation NELBO and perplexity
  bound, sampling tokens/s (``sampling.json`` of the benchmark);
* ``fits.csv`` / ``fits.json``: ``L = E + A X^-alpha`` (NELBO) for X = decoder layers (per
  combination of the other grid axes), non-embedding parameters and training FLOPs, each
  parameter with its bootstrap standard error and 95% interval;
* ``best_depth.csv``: for each compute budget (the points' training FLOPs), the decoder
  depth of the best point that fits in it;
* ``fit_<x>.png`` (the fit and its 95% band), ``pareto_sampling.png`` (NELBO against
  sampling throughput) and ``pareto_flops.png`` (NELBO against training FLOPs), each
  frontier highlighted;
* ``report.md``: all of it in one page.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from launchers.submit import write_text_atomic
from launchers.sweep.bench import RESULT_FILE
from launchers.sweep.fit import PARAMS, PowerLawFit, bootstrap_fit
from launchers.sweep.spec import AXES, SweepSpec
from launchers.sweep.status import SUMMARY_FILE, sweep_status

FIT_AXES = {"decoder_layers": "decoder layers", "non_embedding_params": "non-embedding parameters",
            "train_flops": "training FLOPs"}
COLUMNS = ("point", "variant", "decoder_layers", "encoder_layers", "hidden_size", "block_size",
           "steps", "tokens", "params", "non_embedding_params", "train_flops", "valid_nelbo",
           "valid_ppl", "sampling_tokens_per_s")


@dataclass(frozen=True)
class Fit:
    x: str  # a FIT_AXES key
    group: str  # the other grid values the points share ("all" when pooled)
    fit: PowerLawFit | None
    note: str = ""  # why there is no fit


def point_rows(spec: SweepSpec) -> tuple[list[dict], list[str]]:
    """One row per done point, and the names of the points that are not done."""
    rows, missing = [], []
    for status in sweep_status(spec):
        point = status.point
        if status.state != "done":
            missing.append(f"{point.name} ({status.state}: {status.detail})")
            continue
        summary = json.loads((point.run_dir / SUMMARY_FILE).read_text())
        sampling = json.loads((point.run_dir / RESULT_FILE).read_text())
        cfg = point.config
        rows.append({
            "point": point.name, "variant": cfg.model.variant,
            "decoder_layers": cfg.model.num_decoder_layers, "encoder_layers": cfg.model.num_layers,
            "hidden_size": cfg.model.hidden_size, "block_size": cfg.model.block_size,
            "steps": summary["step"], "tokens": summary["tokens"], "params": summary["params"],
            "non_embedding_params": summary["non_embedding_params"],
            "train_flops": summary["train_flops"], "valid_nelbo": summary["nelbo"],
            "valid_ppl": summary["ppl"], "sampling_tokens_per_s": sampling["tokens_per_s"],
            "_group": ", ".join(f"{a}={v}" for a, v in point.values.items()
                                if a != "decoder_layers") or "all",
        })
    return rows, missing


def fit_all(spec: SweepSpec, rows: list[dict], draws: int = 1000) -> list[Fit]:
    fits = []
    for x in FIT_AXES:
        groups: dict[str, list[dict]] = {}
        for row in rows:
            groups.setdefault(row["_group"] if x == "decoder_layers" else "all", []).append(row)
        for group, members in sorted(groups.items()):
            xs = [float(r[x]) for r in members]
            if len(set(xs)) < 3:
                fits.append(Fit(x, group, None, f"needs >= 3 distinct {FIT_AXES[x]}, "
                                                f"have {len(set(xs))}"))
                continue
            fits.append(Fit(x, group, bootstrap_fit(xs, [r["valid_nelbo"] for r in members],
                                                    draws=draws)))
    return fits


def pareto(rows: Sequence[dict], key: str, higher_is_better: bool) -> list[dict]:
    """Rows not dominated in (lower NELBO, better ``key``), ordered along ``key``."""
    ordered = sorted(rows, key=lambda r: (-r[key] if higher_is_better else r[key],
                                          r["valid_nelbo"]))
    frontier, best = [], float("inf")
    for row in ordered:
        if row["valid_nelbo"] < best:
            frontier.append(row)
            best = row["valid_nelbo"]
    return frontier


def best_depth_per_budget(rows: Sequence[dict]) -> list[dict]:
    out = []
    for budget in sorted({r["train_flops"] for r in rows}):
        within = [r for r in rows if r["train_flops"] <= budget * (1 + 1e-9)]
        best = min(within, key=lambda r: r["valid_nelbo"])
        out.append({"budget_flops": budget, "point": best["point"],
                    "decoder_layers": best["decoder_layers"], "valid_nelbo": best["valid_nelbo"]})
    return out


def _csv(rows: Sequence[dict], columns: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore",
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    if isinstance(value, int) and abs(value) >= 10**5:
        return f"{value:.3e}"
    return str(value)


def _markdown(rows: Sequence[dict], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _fit_rows(fits: Sequence[Fit]) -> list[dict]:
    rows = []
    for f in fits:
        row = {"x": f.x, "group": f.group, "note": f.note}
        if f.fit is not None:
            row |= f.fit.as_dict()
        rows.append(row)
    return rows


def _fit_table(fits: Sequence[Fit]) -> str:
    lines = ["| X | points | E | A | alpha | rmse |", "| --- | --- | --- | --- | --- | --- |"]
    for f in fits:
        label = FIT_AXES[f.x] + ("" if f.group == "all" else f" ({f.group})")
        if f.fit is None:
            lines.append(f"| {label} | - | {f.note} | | | |")
            continue
        cells = []
        for name in PARAMS:
            lo, hi = f.fit.ci(name)
            cells.append(f"{_fmt(getattr(f.fit, name))} ± {_fmt(f.fit.se(name))} "
                         f"[{_fmt(lo)}, {_fmt(hi)}]")
        lines.append(f"| {label} | {f.fit.n} | " + " | ".join(cells) + f" | {_fmt(f.fit.rmse)} |")
    return "\n".join(lines) + "\n"


def collect(spec: SweepSpec, draws: int = 1000) -> str:
    """Write the results (module docstring); return a one-line summary."""
    from launchers.sweep import plots

    out = spec.results_dir
    rows, missing = point_rows(spec)
    if not rows:
        return f"sweep {spec.name}: no finished point yet; not done: {', '.join(missing)}"
    fits = fit_all(spec, rows, draws)
    budgets = best_depth_per_budget(rows)
    fit_rows = _fit_rows(fits)
    fit_columns = ["x", "group", "n", *[f"{p}{s}" for p in PARAMS
                                        for s in ("", "_se", "_ci_low", "_ci_high")],
                   "rmse", "bootstrap_draws", "note"]
    write_text_atomic(out / "points.csv", _csv(rows, COLUMNS))
    write_text_atomic(out / "points.md", _markdown(rows, COLUMNS))
    write_text_atomic(out / "fits.csv", _csv(fit_rows, fit_columns))
    write_text_atomic(out / "fits.json", json.dumps(fit_rows, indent=2) + "\n")
    write_text_atomic(out / "best_depth.csv",
                      _csv(budgets, ("budget_flops", "point", "decoder_layers", "valid_nelbo")))
    images = plots.write_all(out, rows, fits, pareto(rows, "sampling_tokens_per_s", True),
                             pareto(rows, "train_flops", False))
    report = [f"# Sweep {spec.name}\n", f"Spec: `{spec.path}`. {len(rows)} of "
              f"{len(spec.points)} points finished.\n"]
    if missing:
        report.append("Not finished (left out): " + ", ".join(missing) + "\n")
    report += ["## Points\n", _markdown(rows, COLUMNS),
               "## Fits: NELBO = E + A · X^-alpha\n",
               "Each parameter: estimate ± bootstrap standard error [95% interval].\n",
               _fit_table(fits), "## Best decoder depth per compute budget\n",
               _markdown(budgets, ("budget_flops", "point", "decoder_layers", "valid_nelbo")),
               "## Plots\n", *[f"![{Path(p).stem}]({Path(p).name})\n" for p in images]]
    write_text_atomic(out / "report.md", "\n".join(report))
    grid = ", ".join(f"{a} {list(v)}" for a, v in spec.grid.items() if a in AXES)
    return (f"sweep {spec.name} ({grid}): {len(rows)}/{len(spec.points)} points, "
            f"{sum(f.fit is not None for f in fits)} fits; report {out / 'report.md'}")

