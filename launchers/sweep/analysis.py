"""What a sweep's points say, with their noise: the best depth per budget (or the depths that
tie), the Pareto frontiers, the scaling-law fits, their leave-largest-out validation and the
compute-optimal decoder depth, and OLMo's two-step prediction of a task accuracy (``two_step``).

A point is a dict (``collect.point_rows``) with its runs' NELBOs (``runs``), their mean
``valid_nelbo`` and its standard error ``valid_nelbo_se`` (and ``valid_nelbo_paired_se``
when it ran with every seed). Two points differ *beyond noise* when their NELBOs differ by
more than ``Z`` standard errors of the difference (``difference_se``: paired for points run
with the same seeds); every choice below is made only on such differences.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from launchers.sweep.fit import Fit, Z, fit, fit_sigmoid, sigmoid

NELBO = "validation NELBO (nats/token)"  # the default response's label
# single-axis fits: x -> its label; each is fitted per value of the axes it does not vary with
FIT_AXES = {"decoder_layers": "decoder layers", "non_embedding_params": "non-embedding parameters",
            "train_flops": "training FLOPs"}
JOINT_AXES = ("non_embedding_params", "tokens")
LEAVE_OUT_FACTOR = 1.5  # leave-largest-out: the points within this factor of the most FLOPs


def difference_se(a: dict, b: dict) -> float:
    """The standard error of ``b - a``: paired when both ran with the same seeds (their
    shared seed offsets cancel), else from their independent standard errors."""
    paired = (a.get("valid_nelbo_paired_se", np.nan), b.get("valid_nelbo_paired_se", np.nan))
    if np.all(np.isfinite(paired)):
        return float(np.hypot(*paired))
    return float(np.hypot(a["valid_nelbo_se"], b["valid_nelbo_se"]))


def beyond_noise(a: dict, b: dict) -> bool:
    """``a`` has a lower NELBO than ``b`` by more than ``Z`` standard errors of the
    difference."""
    return b["valid_nelbo"] - a["valid_nelbo"] > Z * difference_se(a, b)


def best_depth(points: Sequence[dict]) -> list[dict]:
    """Per budget group: the depth whose NELBO beats every other beyond noise, or the depths
    that tie with the lowest (those not beaten beyond noise by it)."""
    out = []
    for group, members in _groups([p for p in points if p["baseline"] is None], "budget"):
        lowest = min(members, key=lambda p: p["valid_nelbo"])
        tied = sorted(p["decoder_layers"] for p in members if not beyond_noise(lowest, p))
        out.append({"group": group, "train_flops": _mean(members, "train_flops"),
                    "verdict": "winner" if len(tied) == 1 else "tie",
                    "best_decoder_layers": tied[0] if len(tied) == 1 else "",
                    "tied_decoder_layers": " ".join(map(str, tied)),
                    "lowest_valid_nelbo": lowest["valid_nelbo"],
                    "lowest_valid_nelbo_se": lowest["valid_nelbo_se"]})
    return out


def baseline_comparison(points: Sequence[dict]) -> list[dict]:
    """Per budget group and baseline: its NELBO against the best E2D2 point's, and whether
    they differ beyond noise."""
    out = []
    for group, members in _groups(points, "budget"):
        e2d2 = [p for p in members if p["baseline"] is None]
        if not e2d2:
            continue
        best = min(e2d2, key=lambda p: p["valid_nelbo"])
        for other in (p for p in members if p["baseline"] is not None):
            diff = other["valid_nelbo"] - best["valid_nelbo"]
            se = difference_se(best, other)
            verdict = ("E2D2 better" if beyond_noise(best, other) else
                       f"{other['baseline']} better" if beyond_noise(other, best) else "tie")
            out.append({"group": group, "baseline": other["baseline"],
                        "baseline_valid_nelbo": other["valid_nelbo"],
                        "e2d2_point": best["point"], "e2d2_valid_nelbo": best["valid_nelbo"],
                        "difference": diff, "difference_se": se, "verdict": verdict})
    return out


def pareto(points: Sequence[dict], cost: str) -> list[dict]:
    """The points no other point beats: one beats another when it costs no more (``cost``,
    lower is better) and its NELBO is lower beyond noise. Ordered by cost."""
    return sorted((p for p in points if not any(
        o is not p and o[cost] <= p[cost] and beyond_noise(o, p) for o in points)),
        key=lambda p: p[cost])


def _groups(points: Sequence[dict], key: str) -> list[tuple[str, list[dict]]]:
    """Points grouped by ``p["groups"][key]`` (a label), in a stable order."""
    groups: dict[str, list[dict]] = {}
    for p in points:
        groups.setdefault(p["groups"][key], []).append(p)
    def order(item: tuple[str, list[dict]]) -> tuple:
        depths = [p["decoder_layers"] or 0 for p in item[1]]
        return (min(depths) if key == "flops_axis" else 0, _mean(item[1], "train_flops"),
                item[0])

    return sorted(groups.items(), key=order)


def _mean(points: Sequence[dict], key: str) -> float:
    return float(np.mean([p[key] for p in points]))


@dataclass(frozen=True)
class ScalingFit:
    """One fit of the sweep: ``x`` (a FIT_AXES key, or "joint"), the group of points it
    covers, and the fit (``Fit.identified`` says whether it is a result)."""

    x: str
    group: str
    points: tuple[str, ...]
    fit: Fit


def fit_all(points: Sequence[dict], draws: int) -> list[ScalingFit]:
    """Single-axis fits per group, never pooled, and the joint fit per group of the axes
    that are neither depth nor budget; E2D2 points only."""
    e2d2 = [p for p in points if p["baseline"] is None]
    fits = []
    for x in FIT_AXES:
        key = "flops_axis" if x == "train_flops" else "budget"
        for group, members in _groups(e2d2, key):
            members = sorted(members, key=lambda p: p[x])
            fits.append(ScalingFit(x, group, tuple(p["point"] for p in members),
                                   fit("single", [p[x] for p in members],
                                       [p["runs"] for p in members], draws)))
    for group, members in _groups(e2d2, "joint"):
        fits.append(ScalingFit("joint", group, tuple(p["point"] for p in members),
                               fit_joint(members, draws)))
    return fits


def fit_joint(points: Sequence[dict], draws: int) -> Fit:
    return fit("joint", [[p[a] for a in JOINT_AXES] for p in points],
               [p["runs"] for p in points], draws)


def held_out(points: Sequence[dict]) -> tuple[list[dict], list[dict]]:
    """The E2D2 points within ``LEAVE_OUT_FACTOR`` of the most training FLOPs (the
    leave-largest-out targets), and the others."""
    e2d2 = [p for p in points if p["baseline"] is None]
    top = max((p["train_flops"] for p in e2d2), default=0.0)
    held = [p for p in e2d2 if p["train_flops"] * LEAVE_OUT_FACTOR > top]
    return held, [p for p in e2d2 if p not in held]


def validate(points: Sequence[dict], draws: int) -> tuple[Fit | None, list[dict]]:
    """Leave-largest-out: the joint fit without the points within ``LEAVE_OUT_FACTOR`` of
    the most training FLOPs, and its prediction of each of them against its measurement."""
    held, kept = held_out(points)
    if not held:
        return None, []
    reduced = fit_joint(kept, draws) if kept else None
    rows = []
    for p in held:
        row = {"point": p["point"], "train_flops": p["train_flops"],
               "measured": p["valid_nelbo"], "measured_se": p["valid_nelbo_se"]}
        if reduced is not None and reduced.identified:
            x = [[p[a] for a in JOINT_AXES]]
            predicted = float(reduced.predict(x)[0])
            draws_ = reduced.predict_draws(x)[:, 0]
            lo, hi = np.percentile(draws_, [2.5, 97.5])
            error = predicted - p["valid_nelbo"]
            se = float(np.hypot(p["valid_nelbo_se"], draws_.std(ddof=1)))
            row |= {"predicted": predicted, "predicted_ci_low": float(lo),
                    "predicted_ci_high": float(hi), "error": error, "error_in_se": error / se}
        rows.append(row)
    return reduced, rows


def compute_optimal(points: Sequence[dict], joint: Fit, budgets: Sequence[float],
                    sampling_tokens: float) -> list[dict]:
    """The decoder depth (of the sweep's depths) with the lowest NELBO the joint fit predicts
    at each FLOPs budget, with its bootstrap 95% interval: for training compute alone, and for
    training plus ``sampling_tokens`` generated tokens (at each depth's analytic FLOPs per
    generated token). ``extrapolated``: the budget is beyond the sweep's; a best depth at the
    end of the sweep's depths is only a bound (the note says so)."""
    depths: dict[int, dict] = {}
    for p in sorted(points, key=lambda p: p["decoder_layers"] or 0):
        if p["baseline"] is None:
            depths.setdefault(p["decoder_layers"], p)
    if not joint.identified or not depths:
        return []
    top = max(p["train_flops"] for p in points)
    objectives = [("training", 0.0)]
    if sampling_tokens > 0:
        objectives.append((f"training + {sampling_tokens:.3g} sampled tokens", sampling_tokens))
    rows = []
    for budget in budgets:
        for objective, tokens in objectives:
            d = np.array(list(depths))
            train_tokens = np.array([(budget - tokens * depths[k]["sampling_flops_per_token"])
                                     / depths[k]["train_flops_per_token"] for k in d])
            feasible = train_tokens > 0
            row = {"budget_flops": budget, "objective": objective,
                   "extrapolated": budget > top * 1.001}
            if not feasible.any():
                rows.append(row | {"note": "sampling alone exceeds the budget"})
                continue
            x = np.array([[depths[k]["non_embedding_params"], t]
                          for k, t in zip(d[feasible], train_tokens[feasible], strict=True)])
            best = d[feasible][np.argmin(joint.predict(x))]
            chosen = d[feasible][np.argmin(joint.predict_draws(x), axis=1)]
            lo, hi = np.percentile(chosen, [2.5, 97.5], method="nearest")
            edge = best in (d.min(), d.max())
            rows.append(row | {"best_decoder_layers": int(best), "ci_low": int(lo),
                               "ci_high": int(hi), "share_of_draws": float(np.mean(chosen == best)),
                               "note": "at the edge of the sweep's depths: the optimum may lie "
                                       "beyond them" if edge else ""})
    return rows


def _interval95(values: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(values, [2.5, 97.5])
    return float(lo), float(hi)


def run_pairs(point: dict, loss: str, accuracy: str) -> list[tuple[float, float]]:
    """``(loss, accuracy)`` of each of ``point``'s runs that has both (paired by seed)."""
    accs = {s: v for s, v, _ in point["samples"][accuracy]}
    return [(v, accs[s]) for s, v, _ in point["samples"][loss]
            if s in accs and np.isfinite(v) and np.isfinite(accs[s])]


def two_step(points: Sequence[dict], loss: str, accuracy: str, reduced: Fit | None,
             draws: int) -> tuple[Fit, list[dict]]:
    """OLMo's ladder prediction of ``accuracy`` at the leave-largest-out points (``held_out``)
    from the others: step 1 the joint fit of ``loss`` without them (``reduced``, from
    ``validate`` on ``loss``), step 2 ``fit_sigmoid`` of the accuracy against the loss over
    the kept points' runs; chained, the accuracy at each held-out point's size and tokens,
    each bootstrap draw of step 1 through one of step 2 (the two bootstraps are independent).
    Also step 2 alone at the point's measured loss (what step 2's error is on its own).
    ``points`` are ``collect.point_rows``' (their ``samples``); rows say "not identified"
    (with the reason) where a step is."""
    held, kept = held_out(points)
    runs = [pair for p in kept for pair in run_pairs(p, loss, accuracy)]
    curve = fit_sigmoid([r[0] for r in runs], [r[1] for r in runs], draws)
    if not kept:  # name the reason rather than "0 runs"
        curve = dataclasses.replace(curve, reason=f"every point is within {LEAVE_OUT_FACTOR}x "
                                    "of the most training FLOPs (held out): none to fit on")
    rows = []
    for p in held:
        mine = [(s, v, e) for s, v, e in p["samples"][accuracy] if np.isfinite(v)]
        losses = [v for _, v, _ in p["samples"][loss] if np.isfinite(v)]
        if not mine or not losses:
            continue
        values = [v for _, v, _ in mine]
        # every run answers the same items: their sampling error (the task's own standard
        # error) is common to the seeds and adds to the seeds' spread
        spread = float(np.std(values, ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0
        items = [e for _, _, e in mine if np.isfinite(e)]
        se = float(np.hypot(spread, np.mean(items) if items else 0.0))
        row = {"point": p["point"], "metric": accuracy, "loss_metric": loss,
               "measured_loss": float(np.mean(losses)), "measured": float(np.mean(values)),
               "measured_se": se}
        if not curve.identified:
            row["note"] = f"step 2 not identified: {curve.reason}"
            rows.append(row)
            continue
        at_loss = curve.predict_draws([row["measured_loss"]])[:, 0]
        row |= {"step2_predicted": float(curve.predict([row["measured_loss"]])[0])}
        row["step2_ci_low"], row["step2_ci_high"] = _interval95(at_loss)
        if reduced is None or not reduced.identified:
            why = "no points left" if reduced is None else reduced.reason
            row["note"] = f"step 1 (the joint fit without these points) not identified: {why}"
            rows.append(row)
            continue
        x = [[p[a] for a in JOINT_AXES]]
        predicted_loss = float(reduced.predict(x)[0])
        n = min(len(reduced.draws), len(curve.draws))
        chained = sigmoid(curve.draws[:n], reduced.predict_draws(x)[:n])[:, 0]
        lo, hi = _interval95(chained)
        predicted = float(curve.predict([predicted_loss])[0])
        error = predicted - row["measured"]
        total = float(np.hypot(se, np.std(chained, ddof=1)))
        row |= {"predicted_loss": predicted_loss, "predicted": predicted,
                "predicted_ci_low": lo, "predicted_ci_high": hi, "error": error,
                "error_in_se": error / total if total > 0 else float("nan"), "note": ""}
        rows.append(row)
    return curve, rows
