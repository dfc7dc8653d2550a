"""Sweep status (stale runs included), resubmission choice, collect (per-run and per-point
tables, fits, comparisons that respect noise, figures, report) and the sampling benchmark,
on run directories laid out as `e2d2 pretrain` writes them."""

from __future__ import annotations

import csv
import json
import os
import subprocess

import numpy as np
import pytest
import yaml
from test_sweep_spec import write_spec

from launchers.cli import main
from launchers.config import save_run_config
from launchers.sweep import analysis
from launchers.sweep import status as status_module
from launchers.sweep import submit as submit_module
from launchers.sweep.bench import sampling_benchmark
from launchers.sweep.spec import load_spec
from launchers.sweep.status import STATE_FILE, sweep_status
from launchers.sweep.submit import to_submit
from megatron_ext.verify import tiny_model_config

E, A, ALPHA = 2.0, 1.5, 0.8  # the synthetic runs' NELBO law over decoder depth


def finish_point(point, nelbo: float, tokens_per_s: float, flops: float, params: int) -> None:
    """What a successful `e2d2 pretrain` run plus the benchmark leave in a run directory."""
    run = point.run_dir
    run.mkdir(parents=True)
    save_run_config(point.config, run / "config.yaml")
    records = [{"step": s, "loss": 5.0 - s / 10, "lr": 1e-3, "grad_norm": 1.0,
                "tokens_per_s": 100.0, "skipped": 0} for s in (1, 2, 3)]
    records.append({"step": 3, "nelbo": nelbo, "ppl": 2.718281828 ** nelbo,
                    "nelbo_std_error": 0.2})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "summary.json").write_text(json.dumps({
        "step": 3, "nelbo": nelbo, "nelbo_std_error": 0.2, "ppl": 2.718281828 ** nelbo,
        "params": params + 33280, "non_embedding_params": params, "train_flops": flops,
        "tokens": 12288}))
    (run / "sampling.json").write_text(json.dumps({
        "tokens_per_s": tokens_per_s, "nfe": 32,
        "tokens_per_s_repeats": [tokens_per_s * f for f in (0.95, 1.0, 1.05)]}))


DEPTHS = [1, 2, 3, 4, 6, 8]


@pytest.fixture
def finished_sweep(tmp_path):
    """Six depths x 3 seeds following the law with 0.5% noise per run."""
    spec = load_spec(write_spec(tmp_path, grid={"decoder_layers": DEPTHS}, seeds=3))
    rng = np.random.default_rng(0)
    for point in spec.points:
        d = point.values["decoder_layers"]
        finish_point(point, (E + A * d ** -ALPHA) * np.exp(rng.normal(0, 0.005)),
                     tokens_per_s=1000.0 / d, flops=1e12 * (4 + d), params=10000 * (4 + d))
    return spec


def test_collect_writes_runs_points_fits_figures_and_report(finished_sweep, capsys):
    spec = finished_sweep
    assert main(["sweep", "collect", str(spec.path), "--draws", "200"]) == 0
    out = spec.results_dir
    runs = list(csv.DictReader((out / "runs.csv").open()))
    assert len(runs) == 18 and {r["seed"] for r in runs} == {"0", "1", "2"}
    points = list(csv.DictReader((out / "points.csv").open()))
    assert [p["point"] for p in points] == [f"dec{d}" for d in DEPTHS]
    for p in points:  # the mean over its three runs, with a standard error
        mine = [float(r["valid_nelbo"]) for r in runs if r["point"] == p["point"]]
        assert float(p["valid_nelbo"]) == pytest.approx(np.mean(mine))
        assert int(p["runs"]) == 3 and 0 < float(p["valid_nelbo_se"]) < 0.05
        assert float(p["valid_nelbo_eval_se"]) == pytest.approx(0.2) and float(p["sampling_flops_per_token"]) > 0
        assert float(p["sampling_tokens_per_s_sd"]) > 0

    fits = json.loads((out / "fits.json").read_text())
    depth = next(f for f in fits if f["x"] == "decoder_layers")
    assert depth["identified"], depth["reason"]
    assert depth["alpha_ci_low"] < ALPHA < depth["alpha_ci_high"]
    assert depth["E_ci_low"] < E < depth["E_ci_high"]
    joint = next(f for f in fits if f["x"] == "joint")
    assert not joint["identified"] and "E" not in joint  # one token budget: D is not varied
    for stem in ("fit_decoder_layers", "fit_non_embedding_params", "pareto_sampling_flops",
                 "pareto_tokens_per_s"):
        assert (out / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (out / f"{stem}.pdf").read_bytes()[:5] == b"%PDF-"
    report = (out / "report.md").read_text()
    assert "## What is significant" in report and "**not identified**" in report
    assert "decoder layers (all): identified" in report
    assert "18/18 runs" in capsys.readouterr().out


def _point(name, nelbo, se, depth=1, cost=1.0, group="train_flops=1e+12"):
    return {"point": name, "baseline": None, "decoder_layers": depth, "valid_nelbo": nelbo,
            "valid_nelbo_se": se, "train_flops": 1e12, "cost": cost,
            "groups": {"budget": group}}


def test_best_depth_reports_a_tie_when_differences_are_within_noise():
    """0.0007 nats apart with standard errors of 0.2: no winner (the issue's example)."""
    points = [_point("dec1", 7.0460, 0.2, 1), _point("dec2", 7.0467, 0.2, 2),
              _point("dec4", 7.9, 0.2, 4)]
    [row] = analysis.best_depth(points)
    assert row["verdict"] == "tie" and row["best_decoder_layers"] == ""
    assert row["tied_decoder_layers"] == "1 2"  # depth 4 is worse beyond noise


def test_best_depth_names_a_winner_only_beyond_noise():
    points = [_point("dec1", 7.0, 0.01, 1), _point("dec2", 7.1, 0.01, 2)]
    [row] = analysis.best_depth(points)
    assert (row["verdict"], row["best_decoder_layers"]) == ("winner", 1)


def test_pareto_keeps_points_not_beaten_beyond_noise():
    points = [_point("cheap", 7.00, 0.05, cost=1.0), _point("close", 6.95, 0.05, cost=2.0),
              _point("better", 6.50, 0.05, cost=3.0), _point("beaten", 7.20, 0.05, cost=4.0)]
    # "close" is 0.05 better than "cheap", within 2 combined SE: both stay on the frontier
    assert [p["point"] for p in analysis.pareto(points, "cost")] == ["cheap", "close", "better"]


def test_a_changed_spec_makes_runs_stale_and_submit_reruns_them(tmp_path, monkeypatch):
    """A done run trained on another hidden size: status says stale and why, collect leaves
    it out, submit moves its run directory aside and submits it again."""
    path = write_spec(tmp_path, grid={"decoder_layers": [1, 2]})
    for point in load_spec(path).points:
        finish_point(point, 3.0, 10.0, 1e12, 1000)
    spec_data = yaml.safe_load(path.read_text())
    spec_data["overrides"] += ["model.hidden_size=64"]
    path.write_text(yaml.safe_dump(spec_data))
    spec = load_spec(path)
    statuses = sweep_status(spec)
    assert [s.state for s in statuses] == ["stale", "stale"]
    assert "model.hidden_size: 32 -> 64" in statuses[0].detail
    assert to_submit(statuses) == list(spec.points)
    assert main(["sweep", "collect", str(path)]) == 0
    assert not (spec.results_dir / "points.csv").exists()  # nothing of the old config

    jobs = iter(["71", "72"])
    monkeypatch.setattr(submit_module, "require_sbatch", lambda: None)
    monkeypatch.setattr(submit_module, "sbatch", lambda *args: next(jobs))
    monkeypatch.setattr(submit_module, "validate_data", lambda configs: None)
    messages = "\n".join(submit_module.submit_slurm(spec))
    assert "0 done, 0 queued, 2 to submit" in messages and "moved to" in messages
    kept = sorted((spec.output / "stale").iterdir())
    assert [k.name.rsplit("-", 2)[0] for k in kept] == ["dec1-seed0", "dec2-seed0"]
    assert (kept[0] / "summary.json").is_file()  # the old run is kept, not deleted
    assert not spec.points[0].run_dir.exists()
    state = json.loads((spec.output / STATE_FILE).read_text())
    assert state["points"]["dec1-seed0"]["job"] == "71_0"
    saved = yaml.safe_load((spec.output / "configs" / "dec1-seed0.yaml").read_text())
    assert saved["model"]["hidden_size"] == 64


def test_status_per_run_and_what_a_rerun_resubmits(tmp_path, monkeypatch):
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
    assert len(result["tokens_per_s_repeats"]) == 5  # each repeat kept: the spread is reported


@pytest.mark.slow
def test_local_rerun_benchmarks_a_trained_run_without_training_it_again(tmp_path, capsys):
    """--local: a run with summary.json but no benchmark runs only the benchmark (a real
    `e2d2 sweep bench` process); a done run is skipped; then the results are collected."""
    spec = load_spec(write_spec(tmp_path, grid={"decoder_layers": [1, 2]}))
    for point in spec.points:
        finish_point(point, 3.0, 10.0, 1e12, 1000)
    trained = spec.points[1]
    (trained.run_dir / "sampling.json").unlink()
    before = (trained.run_dir / "metrics.jsonl").read_text()
    assert main(["sweep", "submit", str(spec.path), "--local", "--jobs", "2"]) == 0
    out = capsys.readouterr().out
    assert "run dec2-seed0: exit code 0" in out and "run dec1-seed0" not in out
    result = json.loads((trained.run_dir / "sampling.json").read_text())
    assert result["tokens_per_s"] > 0 and result["device"] == "cpu"
    assert (trained.run_dir / "metrics.jsonl").read_text() == before  # not trained again
    assert (spec.results_dir / "runs.csv").read_text().count("\ndec") == 2


def test_points_run_with_the_same_seeds_are_compared_paired():
    """Seed 1 sits 0.05 above seed 0 at every depth (its evaluation's noise draws): depth 1
    is 0.01 better in both seeds. Unpaired, that is a tie; paired by seed, a winner."""
    from launchers.sweep.collect import add_paired_se

    def point(name, depth, nelbos, seeds):
        p = _point(name, float(np.mean(nelbos)), 0.03, depth)
        return p | {"runs": nelbos, "seeds": seeds}

    paired = [point("dec1", 1, [6.00, 6.051], [0, 1]), point("dec2", 2, [6.01, 6.06], [0, 1]),
              point("dec4", 4, [6.02, 6.069], [0, 1])]
    add_paired_se(paired)
    assert 0 < paired[0]["valid_nelbo_paired_se"] < 0.002
    [row] = analysis.best_depth(paired)
    assert (row["verdict"], row["best_decoder_layers"]) == ("winner", 1)
    # the same numbers from different seeds share no offset: no pairing, a tie
    unpaired = [point("dec1", 1, [6.00, 6.051], [0, 1]), point("dec2", 2, [6.01, 6.06], [2, 3]),
                point("dec4", 4, [6.02, 6.069], [4, 5])]
    add_paired_se(unpaired)
    assert all(np.isnan(p["valid_nelbo_paired_se"]) for p in unpaired)
    assert analysis.best_depth(unpaired)[0]["verdict"] == "tie"


def test_eval_metrics_from_the_cache_land_in_the_tables_and_any_metric_is_the_response(
        tmp_path, capsys):
    """Results a previous collect stored per run (``sweep_eval.json``, keyed by step and
    settings) are read, not recomputed; each metric lands in runs.csv and points.csv with its
    standard errors; ``--metric`` makes an accuracy the response, higher being better."""
    from launchers.sweep.evals import CACHE_FILE, corpus_key, task_key

    held = tmp_path / "held.jsonl"
    held.write_text('{"text": "a"}\n')
    spec = load_spec(write_spec(tmp_path, grid={"decoder_layers": DEPTHS}, seeds=3,
                                eval={"corpora": {"held": {"data": str(held)}},
                                      "tasks": ["kjv_cloze"], "task_args": {"limit": 50}}))
    rng = np.random.default_rng(0)
    for point in spec.points:
        d = point.values["decoder_layers"]
        finish_point(point, E + A * d ** -ALPHA, tokens_per_s=1000.0 / d, flops=1e12 * (4 + d),
                     params=10000 * (4 + d))
        cache = {
            corpus_key(spec.evals, spec.evals.corpora[0], 3): {"metrics": {"held_nelbo": {
                "value": 3.0 + A * d ** -ALPHA + rng.normal(0, 0.005), "se": 0.05,
                "higher_is_better": False}}},
            task_key(spec.evals, "kjv_cloze", 3): {"metrics": {"kjv_cloze_acc": {
                "value": 0.3 + 0.06 * d + rng.normal(0, 0.01), "se": 0.02,
                "higher_is_better": True}}}}
        (point.run_dir / CACHE_FILE).write_text(json.dumps(cache))
    assert main(["sweep", "collect", str(spec.path), "--draws", "100",
                 "--metric", "kjv_cloze_acc"]) == 0
    assert "0 evaluation(s) run" in capsys.readouterr().out  # all from the cache
    out = spec.results_dir
    runs = list(csv.DictReader((out / "runs.csv").open()))
    assert all(float(r["kjv_cloze_acc_eval_se"]) == 0.02 for r in runs)
    points = {p["point"]: p for p in csv.DictReader((out / "points.csv").open())}
    dec8 = points["dec8"]
    mine = [float(r["kjv_cloze_acc"]) for r in runs if r["point"] == "dec8"]
    assert float(dec8["kjv_cloze_acc"]) == pytest.approx(np.mean(mine))  # an accuracy, as is
    assert 0 < float(dec8["kjv_cloze_acc_se"]) < 0.02 and float(dec8["held_nelbo_se"]) > 0
    [best] = list(csv.DictReader((out / "best_depth.csv").open()))
    assert (best["verdict"], best["best_decoder_layers"]) == ("winner", "8")  # highest acc
    assert float(best["lowest_response"]) == pytest.approx(1 - float(dec8["kjv_cloze_acc"]))
    two_step = list(csv.DictReader((out / "two_step.csv").open()))
    assert [r["point"] for r in two_step] == ["dec6", "dec8"]  # the largest FLOPs, held out
    assert all(r["loss_metric"] == "valid_nelbo" and r["note"] for r in two_step)
    report = (out / "report.md").read_text()
    assert "The response is **1 - kjv_cloze_acc (error)**" in report
    assert "## Two-step prediction" in report and "two_step_kjv_cloze_acc.png" in report

    assert main(["sweep", "collect", str(spec.path), "--draws", "100",
                 "--metric", "held_nelbo"]) == 0
    fits = json.loads((out / "fits.json").read_text())
    depth = next(f for f in fits if f["x"] == "decoder_layers")
    assert depth["identified"] and depth["E_ci_low"] < 3.0 < depth["E_ci_high"]
    assert main(["sweep", "collect", str(spec.path), "--metric", "kjv_cloze_ac"]) == 2
    assert "--metric kjv_cloze_ac: not a metric of this sweep" in capsys.readouterr().err
    (spec.points[0].run_dir / CACHE_FILE).unlink()  # would be evaluated: refused before that
    assert main(["sweep", "collect", str(spec.path), "--metric", "held"]) == 2
    assert "choose valid_nelbo, a corpus's ['held_nelbo'] or a task's" in capsys.readouterr().err


@pytest.mark.slow
def test_collect_evaluates_a_real_run_once_and_again_when_its_step_or_the_spec_changes(
        tmp_path, monkeypatch, capsys):
    """A real tiny run: collect runs `e2d2 eval` on a corpus and `e2d2 lm-eval` on a task,
    stores them; a second collect runs nothing; a changed corpus setting re-runs that corpus
    only; a run trained further (a later step) and a damaged store re-run both; a corpus
    whose evaluation fails is reported, its metric NaN."""
    from pretrain_helpers import make_data_dir, run_pretrain

    from launchers.sweep import evals
    from launchers.sweep.bench import run_benchmark

    monkeypatch.setenv("E2D2_TASK_PACK", str(tmp_path / "pack"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data = make_data_dir(tmp_path, documents=120)
    eval_section = {"corpora": {"kjv": {"data": str(data), "max_sequences": 4, "draws": 1}},
                    "tasks": ["kjv_cloze"], "task_args": {"mc_draws": 1, "limit": 8}}
    path = write_spec(tmp_path, grid={"decoder_layers": [1]},
                      overrides=["train.steps=2"], eval=eval_section)
    [point] = load_spec(path).points
    save_run_config(point.config, tmp_path / "run.yaml")
    done = run_pretrain(tmp_path / "run.yaml")
    assert done.returncode == 0, done.stderr[-3000:]
    run_benchmark(point.run_dir)
    commands = []
    real_run = evals._run
    monkeypatch.setattr(evals, "_run", lambda command: (commands.append(command[0]),
                                                         real_run(command))[1])

    def collect(failing: bool = False, **changes):
        spec = yaml.safe_load(path.read_text())
        spec["eval"]["corpora"]["kjv"] |= changes
        path.write_text(yaml.safe_dump(spec))
        commands.clear()
        assert main(["sweep", "collect", str(path), "--draws", "20"]) == (1 if failing else 0)
        row, = csv.DictReader((tmp_path / "out" / "results" / "runs.csv").open())
        return row, list(commands)

    row, ran = collect()
    assert ran == ["eval", "lm-eval"]
    assert float(row["kjv_nelbo"]) > 0 and float(row["kjv_nelbo_eval_se"]) > 0
    assert 0 <= float(row["kjv_cloze_acc"]) <= 1 and float(row["kjv_cloze_acc_eval_se"]) > 0
    again, ran = collect()
    assert ran == [] and again["kjv_nelbo"] == row["kjv_nelbo"]  # from the store
    _, ran = collect(max_sequences=3)
    assert ran == ["eval"]  # the changed corpus only; the task is unchanged
    summary = json.loads((point.run_dir / "summary.json").read_text())
    (point.run_dir / "summary.json").write_text(json.dumps(summary | {"step": 3}))
    _, ran = collect()  # "trained further": another step
    assert ran == ["eval", "lm-eval"]
    (point.run_dir / evals.CACHE_FILE).write_text('{"corpus:kjv')  # torn
    _, ran = collect()
    assert ran == ["eval", "lm-eval"]

    bad = tmp_path / "bad.txt"
    bad.write_text("")  # no text at all: `e2d2 eval` refuses it
    row, ran = collect(failing=True, data=str(bad))
    out = capsys.readouterr().out
    assert ran == ["eval"] and row["kjv_nelbo"] == "nan"
    assert "1 evaluation(s) FAILED" in out and "dec1-seed0: corpus kjv: e2d2 eval exit code" in out
    assert "Evaluations that FAILED" in (tmp_path / "out" / "results" / "report.md").read_text()
