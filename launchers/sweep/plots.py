"""PNG plots of a sweep (matplotlib, no display): the fits with their bands, and the
Pareto frontiers of quality against sampling throughput and against training FLOPs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> str:
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    tmp.replace(path)
    return str(path)


def fit_plot(path: Path, x_label: str, groups: Sequence[tuple[str, list[dict], object]],
             x_key: str) -> str:
    """NELBO against ``x_key`` on a log axis: the points, each group's fit, its 95% band."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, rows, fit in groups:
        xs = np.array([r[x_key] for r in rows], dtype=float)
        ys = np.array([r["valid_nelbo"] for r in rows], dtype=float)
        points = ax.scatter(xs, ys, zorder=3, label=f"points ({label})")
        if fit is not None:
            grid = np.geomspace(xs.min() / 1.5, xs.max() * 1.5, 200)
            color = points.get_facecolor()[0]
            ax.plot(grid, fit.predict(grid), color=color,
                    label=f"E={fit.E:.3g}, alpha={fit.alpha:.3g}")
            if len(fit.draws):
                lo, hi = np.percentile(fit.predict_draws(grid), [2.5, 97.5], axis=0)
                ax.fill_between(grid, lo, hi, color=color, alpha=0.2, label="95% bootstrap band")
    ax.set_xscale("log")
    ax.set_xlabel(x_label)
    ax.set_ylabel("validation NELBO (nats/token)")
    ax.set_title(f"NELBO = E + A·X^-alpha, X = {x_label}")
    ax.legend(fontsize=7)
    out = _save(fig, path)
    plt.close(fig)
    return out


def pareto_plot(path: Path, rows: Sequence[dict], frontier: Sequence[dict], x_key: str,
                x_label: str, better: str) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([r[x_key] for r in rows], [r["valid_nelbo"] for r in rows], color="0.6",
               label="points", zorder=2)
    for r in rows:
        ax.annotate(r["point"], (r[x_key], r["valid_nelbo"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    ax.plot([r[x_key] for r in frontier], [r["valid_nelbo"] for r in frontier], "o-",
            color="C3", label="Pareto frontier", zorder=3)
    ax.set_xscale("log")
    ax.set_xlabel(f"{x_label} ({better} is better)")
    ax.set_ylabel("validation NELBO (lower is better)")
    ax.legend(fontsize=8)
    out = _save(fig, path)
    plt.close(fig)
    return out


def write_all(out: Path, rows: list[dict], fits: list, sampling_frontier: list[dict],
              flops_frontier: list[dict]) -> list[str]:
    from launchers.sweep.collect import FIT_AXES

    out.mkdir(parents=True, exist_ok=True)
    images = []
    for x, label in FIT_AXES.items():
        groups = []
        for f in (f for f in fits if f.x == x):
            members = [r for r in rows if x != "decoder_layers" or r["_group"] == f.group]
            groups.append((f.group, members, f.fit))
        images.append(fit_plot(out / f"fit_{x}.png", label, groups, x))
    images.append(pareto_plot(out / "pareto_sampling.png", rows, sampling_frontier,
                              "sampling_tokens_per_s", "sampling tokens/s", "higher"))
    images.append(pareto_plot(out / "pareto_flops.png", rows, flops_frontier, "train_flops",
                              "training FLOPs", "lower"))
    return images
