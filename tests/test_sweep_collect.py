"""Sweep status, resubmission choice, collect (tables, fits, frontiers, plots) and the sampling
benchmark, on run directories laid out as `e2d2 pretrain` writes them."""

from __future__ import annotations

import csv
import json
import os
import subprocess

import pytest
from test_sweep_spec import write_spec

from launchers.cli import main
from launchers.config import save_run_config
from launchers.sweep import status as status_module
from launchers.sweep.bench import sampling_benchmark
from launchers.sweep.collect import best_depth_per_budget, pareto
from launchers.sweep.spec import load_spec
from launchers.sweep.status import STATE_FILE, sweep_status
from launchers.sweep.submit import to_submit
from megatron_ext.verify import tiny_model_config

E, A, ALPHA = 2.0, 1.5, 0.8  # the synthetic points' NELBO law over decoder depth


def finish_point(point, nelbo: float, tokens_per_s: float, flops: float, params: int) -> None:
    """What a successful `e2d2 pretrain` run plus the benchmark leave in a run directory."""
    run = point.run_dir
    run.mkdir(parents=True)
    save_run_config(point.config, run / "config.yaml")
    records = [{"step": s, "loss": 5.0 - s / 10, "lr": 1e-3, "grad_norm": 1.0,
                "tokens_per_s": 100.0, "skipped": 0} for s in (1, 2, 3)]
    records.append({"step": 3, "nelbo": nelbo, "ppl": 2.718281828 ** nelbo})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "summary.json").write_text(json.dumps({
        "step": 3, "nelbo": nelbo, "ppl": 2.718281828 ** nelbo, "params": params + 33280,
        "non_embedding_params": params, "train_flops": flops, "tokens": 12288}))
    (run / "sampling.json").write_text(json.dumps({"tokens_per_s": tokens_per_s, "nfe": 32}))


@pytest.fixture
def finished_sweep(tmp_path):
    spec = load_spec(write_spec(tmp_path, grid={"decoder_layers": [1, 2, 4, 8]}))
    for point in spec.points:
        d = point.values["decoder_layers"]
        finish_point(point, E + A * d ** -ALPHA, tokens_per_s=1000.0 / d,
                     flops=1e12 * (4 + d), params=10000 * (4 + d))
    return spec


def test_collect_writes_tables_fits_frontiers_and_plots(finished_sweep, capsys):
    spec = finished_sweep
    assert main(["sweep", "collect", str(spec.path), "--draws", "50"]) == 0
    out = spec.results_dir
    rows = list(csv.DictReader((out / "points.csv").open()))
    assert [r["point"] for r in rows] == ["dec1", "dec2", "dec4", "dec8"]
    assert [int(r["decoder_layers"]) for r in rows] == [1, 2, 4, 8]
    assert float(rows[2]["valid_nelbo"]) == pytest.approx(E + A * 4 ** -ALPHA)
    assert float(rows[2]["train_flops"]) == 8e12 and int(rows[2]["non_embedding_params"]) == 80000
    assert float(rows[3]["sampling_tokens_per_s"]) == 125.0
    assert (out / "points.md").read_text().count("\n| dec") == 4

    fits = {f["x"]: f for f in json.loads((out / "fits.json").read_text())}
    assert set(fits) == {"decoder_layers", "non_embedding_params", "train_flops"}
    depth = fits["decoder_layers"]
    assert depth["E"] == pytest.approx(E, abs=1e-3) and depth["alpha"] == pytest.approx(ALPHA, rel=1e-3)
    assert depth["A"] == pytest.approx(A, rel=1e-3)
    assert depth["E_ci_low"] <= depth["E"] <= depth["E_ci_high"]
    assert {"E_se", "A_se", "alpha_se", "rmse", "n"} <= set(depth)
    assert len(list(csv.DictReader((out / "fits.csv").open()))) == 3

    best = list(csv.DictReader((out / "best_depth.csv").open()))
    # deeper is better and costs more: each budget's best is the deepest that fits in it
    assert [int(b["decoder_layers"]) for b in best] == [1, 2, 4, 8]
    for name in ("fit_decoder_layers", "fit_non_embedding_params", "fit_train_flops",
                 "pareto_sampling", "pareto_flops"):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "## Best decoder depth per compute budget" in report and "pareto_flops.png" in report
    assert "4/4 points" in capsys.readouterr().out


def test_collect_leaves_out_unfinished_points_and_says_why(tmp_path):
    spec = load_spec(write_spec(tmp_path, grid={"decoder_layers": [1, 2]}))
    finish_point(spec.points[0], 3.0, 10.0, 1e12, 1000)
    assert main(["sweep", "collect", str(spec.path), "--draws", "10"]) == 0
    report = (spec.results_dir / "report.md").read_text()
    assert "dec2 (pending: not submitted)" in report
    assert "needs >= 3 distinct decoder layers, have 1" in report


def _dominated(row, rows, key, higher):
    better = (lambda a, b: a > b) if higher else (lambda a, b: a < b)
    return any((o["valid_nelbo"] <= row["valid_nelbo"] and
                (better(o[key], row[key]) or o[key] == row[key]))
               and (o["valid_nelbo"] < row["valid_nelbo"] or better(o[key], row[key]))
               for o in rows if o is not row)


@pytest.mark.parametrize("key, higher", [("sampling_tokens_per_s", True), ("train_flops", False)])
def test_pareto_frontier_is_the_set_of_non_dominated_points(key, higher):
    import random

    rng = random.Random(0)
    rows = [{"point": str(i), "valid_nelbo": rng.uniform(2, 4), key: rng.uniform(1, 100)}
            for i in range(40)]
    frontier = pareto(rows, key, higher)
    assert {r["point"] for r in frontier} == {r["point"] for r in rows
                                             if not _dominated(r, rows, key, higher)}


def test_best_depth_per_budget_is_the_best_point_within_each_budget():
    rows = [{"point": "a", "decoder_layers": 1, "train_flops": 1.0, "valid_nelbo": 3.0},
            {"point": "b", "decoder_layers": 4, "train_flops": 2.0, "valid_nelbo": 3.5},
            {"point": "c", "decoder_layers": 2, "train_flops": 3.0, "valid_nelbo": 2.5}]
    assert [b["point"] for b in best_depth_per_budget(rows)] == ["a", "a", "c"]


def test_status_per_point_and_what_a_rerun_resubmits(tmp_path, monkeypatch):
    spec = load_spec(write_spec(tmp_path, grid={"decoder_layers": [1, 2, 3, 4, 5, 6, 7]}))
    p = {point.values["decoder_layers"]: point for point in spec.points}
    finish_point(p[1], 3.0, 10.0, 1e12, 1000)
    dead = subprocess.Popen(["true"])
    dead.wait()
    state = {"points": {
        p[2].name: {"job": "local", "pid": os.getpid(), "rc": None},
        p[3].name: {"job": "local", "pid": dead.pid, "rc": None},
        p[4].name: {"job": "local", "pid": dead.pid, "rc": 1},
        p[5].name: {"job": "41_0"}, p[6].name: {"job": "41_1"}, p[7].name: {"job": "41_2"},
    }}
    spec.output.mkdir(parents=True, exist_ok=True)
    (spec.output / STATE_FILE).write_text(json.dumps(state))
    p[5].run_dir.mkdir(parents=True)
    (p[5].run_dir / "metrics.jsonl").write_text(
        json.dumps({"step": 7, "loss": 4.25}) + "\n" + '{"step": 8, "lo')  # torn last line
    monkeypatch.setattr(status_module, "slurm_job_states",
                        lambda: {"41_0": "RUNNING", "41_1": "PENDING", "41_2": "TIMEOUT"})
    statuses = {s.point.values["decoder_layers"]: s for s in sweep_status(spec)}
    assert {d: s.state for d, s in statuses.items()} == {
        1: "done", 2: "running", 3: "failed", 4: "failed", 5: "running", 6: "pending",
        7: "failed"}
    assert (statuses[5].step, statuses[5].loss) == (7, 4.25)
    assert statuses[1].nelbo == 3.0 and "TIMEOUT" in statuses[7].detail
    resubmit = {point.values["decoder_layers"] for point in to_submit(list(statuses.values()))}
    assert resubmit == {3, 4, 7}  # failed ones; done, running and queued ones are left alone


def test_sampling_benchmark_counts_one_denoiser_call_per_token():
    cfg = tiny_model_config("e2d2", seq_length=48)  # block 4: 2 prompt blocks + 8 new blocks
    result = sampling_benchmark(cfg, device="cpu")
    # topk with steps = block_size reveals one token per step: block_size calls per block
    assert (result["new_tokens"], result["nfe"]) == (32, 32)
    assert result["tokens_per_s"] == pytest.approx(4 * 32 / result["seconds"])


@pytest.mark.slow
def test_local_rerun_benchmarks_a_trained_point_without_training_it_again(tmp_path, capsys):
    """--local: a point with summary.json but no benchmark runs only the benchmark (a real
    `e2d2 sweep bench` process); a done point is skipped; then the results are collected."""
    spec = load_spec(write_spec(tmp_path, grid={"decoder_layers": [1, 2]}))
    for point in spec.points:
        finish_point(point, 3.0, 10.0, 1e12, 1000)
    trained = spec.points[1]
    (trained.run_dir / "sampling.json").unlink()
    before = (trained.run_dir / "metrics.jsonl").read_text()
    assert main(["sweep", "submit", str(spec.path), "--local"]) == 0
    out = capsys.readouterr().out
    assert "point dec2: exit code 0" in out and "point dec1" not in out
    result = json.loads((trained.run_dir / "sampling.json").read_text())
    assert result["tokens_per_s"] > 0 and result["device"] == "cpu"
    assert (trained.run_dir / "metrics.jsonl").read_text() == before  # not trained again
    assert (spec.results_dir / "points.csv").read_text().count("\ndec") == 2
