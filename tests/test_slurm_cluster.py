"""On a real SLURM (a single-node cluster on localhost, tests/infra/slurm-up.sh): srun ranks,
multi-task pre-tokenization, a decoder-depth sweep end to end, and preemption with requeue."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from infra.slurm import slurm_cluster
from pretrain_helpers import make_data_dir, write_config
from test_data_helpers import output_files, pydoc_texts, write_jsonl

from e2d2 import flops
from launchers.cli import main as e2d2_main
from launchers.config import load_run_config
from launchers.metrics import read_metrics

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
E2D2 = [sys.executable, "-m", "launchers.cli"]


@pytest.fixture(scope="module")
def cluster():
    with slurm_cluster() as running:
        yield running


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_data_dir(tmp_path_factory.mktemp("data"))


def _results(stdout: str) -> list[dict]:
    return [json.loads(line[len("RESULT "):]) for line in stdout.splitlines()
            if line.startswith("RESULT ")]


def test_two_srun_tasks_form_one_gloo_world_and_train_a_tp2_step(cluster):
    done = cluster.run("srun", "--ntasks=2", "--time=15", "--job-name=tp2-step", sys.executable,
                       ROOT / "tests" / "infra" / "step_worker.py", "--tp", "2", timeout=900,
                       cwd=ROOT)
    results = sorted(_results(done.stdout), key=lambda r: r["rank"])
    assert [r["rank"] for r in results] == [0, 1], done.stdout[-3000:] + done.stderr[-3000:]
    assert all(r["source"] == "slurm" and r["world_size"] == 2 for r in results)
    assert [r["local_rank"] for r in results] == [0, 1]
    assert results[0]["master"] == results[1]["master"]  # one rendezvous for both
    assert [p[0] for p in results[0]["peers"]] == [0, 1]  # gathered over one process group
    assert "tensor-parallel groups: [0, 1]" in results[0]["layout"]
    # the TP2 steps match the single-process reference model
    assert results[0]["mismatches"] == []
    assert results[0]["losses"] == pytest.approx(results[0]["reference_losses"], abs=1e-5)


def test_preprocess_template_shards_over_tasks_then_merges(cluster, tmp_path):
    texts = pydoc_texts(16)
    for i in range(2):
        write_jsonl(tmp_path / f"part{i}.jsonl", texts[i * 8:(i + 1) * 8])
    inputs = [tmp_path / "part0.jsonl", tmp_path / "part1.jsonl"]
    options = ["--valid-docs", "3"]
    single = subprocess.run([*E2D2, "data", "preprocess", "--input", *map(str, inputs),
                             "--tokenizer", "bytes", "--output", str(tmp_path / "single"),
                             *options], capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    env = cluster.env | {"E2D2": " ".join(E2D2)}
    cluster.run("sbatch", "--wait", "--ntasks=2", f"--output={tmp_path}/pre-%j.log",
                ROOT / "slurm" / "preprocess.sbatch", tmp_path / "sharded", "bytes", *inputs,
                "--", *options, env=env, timeout=600, cwd=tmp_path)
    log = next(tmp_path.glob("pre-*.log")).read_text()
    assert "tasks: 2" in log and "done at" in log, log
    sharded = {name: data for name, data in output_files(tmp_path / "sharded").items()
               if not name.startswith("shards/")}  # merge keeps the shards it joined
    assert sharded == output_files(tmp_path / "single")


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(1)


def _final_losses(run_dir: Path) -> dict[int, float]:
    """The loss of every step as the run finally has it (a resumed run logs again the steps
    after its checkpoint: the later record wins)."""
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def _preempt_and_resume(cluster, data, tmp_path, preempt) -> None:
    """Submit a TP2 run with `e2d2 submit`, preempt it after its first checkpoint, and check
    that the job requeued itself, resumed, and ended with the uninterrupted run's losses."""
    config = write_config(tmp_path / "tiny.yaml", data={"path": str(data)}, train={"steps": 6},
                          checkpoint={"interval": 2, "keep": 2},
                          parallel={"tensor_parallel": 2})
    # hold@3: the job waits after step 3 for the signal (a tiny run would otherwise finish
    # before it arrives); the resumed job starts after step 3 and does not hold again.
    submitted = cluster.run(*E2D2, "submit", config, f"run.dir={tmp_path / 'run'}",
                            "--gpus-per-node", "0", "--tasks-per-node", "2", "--time", "20",
                            cwd=tmp_path, env=cluster.env | {"E2D2_FAULTS": "hold@3"})
    job = submitted.stdout.split("submitted job ")[1].split(":")[0]
    run = tmp_path / "run"
    _wait_for(lambda: max(_final_losses(run), default=0) >= 3, 600, "step 3 of the SLURM run")
    preempt(job)
    # the uninterrupted run (the same layout, two local ranks), while the job requeues
    reference = subprocess.Popen([*E2D2, "pretrain", str(config), f"run.dir={tmp_path / 'ref'}",
                                  "--nproc-per-node", "2"], cwd=tmp_path, env=cluster.env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        cluster.wait(job, 900)
        info = cluster.job(job)
        log = next((tmp_path / "slurm-logs").glob(f"run-{job}.log")).read_text()
        assert (info["JobState"], info["Restarts"]) == ("COMPLETED", "1"), log
        assert "preempted (exit 75): requeueing job" in log and "restart 1" in log, log
        assert log.index("run directory: ") < log.index("e2d2 pretrain:")
        assert "resumed from" in log and "done at" in log
        out, _ = reference.communicate(timeout=900)
    finally:
        reference.kill()
    assert reference.returncode == 0, out[-3000:]
    got, want = _final_losses(run), _final_losses(tmp_path / "ref")
    assert sorted(got) == list(range(1, 7))
    assert got == want  # bitwise: the resumed run continues exactly
    assert json.loads((run / "summary.json").read_text())["nelbo"] == \
        json.loads((tmp_path / "ref" / "summary.json").read_text())["nelbo"]


def test_preempted_job_requeues_resumes_and_ends_with_the_uninterrupted_loss(cluster, data,
                                                                             tmp_path):
    """The signal as SLURM delivers --signal=USR1@120 (to every process of the step, the
    checkpoint helpers included), sent now instead of 120 s before the time limit."""
    _preempt_and_resume(cluster, data, tmp_path,
                        lambda job: cluster.run("scancel", "--signal=USR1", job))


def test_decoder_depth_sweep_end_to_end_then_rerun_resubmits_only_the_failed(
        cluster, data, tmp_path, monkeypatch, capsys):
    # submit and status run in this process (the jobs they submit inherit its environment)
    monkeypatch.setenv("SLURM_CONF", cluster.env["SLURM_CONF"])
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(tmp_path)
    base = write_config(tmp_path / "tiny.yaml", data={"path": str(data)}, train={"steps": 4},
                        checkpoint={"interval": 4, "keep": 1})
    spec = tmp_path / "sweep.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "depth", "base": str(base), "output": str(tmp_path / "sweep"),
        "grid": {"decoder_layers": [1, 2, 4]}, "seeds": 2,
        "slurm": {"gpus_per_node": 0, "tasks_per_node": 1, "time": "00:20:00"}}))
    out = tmp_path / "sweep"
    names = [f"dec{d}-seed{k}" for d in (1, 2, 4) for k in (0, 1)]

    def e2d2(*args: str) -> str:
        assert e2d2_main([*args, str(spec)]) == 0
        return capsys.readouterr().out

    first = e2d2("sweep", "submit")
    assert "0 done, 0 queued, 6 to submit" in first
    assert f"({', '.join(names)})" in first  # one array job over the six runs
    state = json.loads((out / "state.json").read_text())
    queued = [line.split()[1] for line in e2d2("sweep", "status").splitlines()[1:7]]
    assert set(queued) <= {"pending", "running"}, queued  # submitted, not finished yet
    collect = state["collect_job"]
    cluster.wait(collect, 1800)
    assert cluster.states(collect) == ["COMPLETED"], cluster.job(collect)
    results = out / "results"
    runs = list(csv.DictReader((results / "runs.csv").open()))
    assert sorted(r["run"] for r in runs) == names
    assert {r["seed"] for r in runs} == {"0", "1"}  # run.seed = base seed + k
    for row in runs:
        cfg = load_run_config(out / "configs" / f"{row['run']}.yaml")
        assert cfg.run.seed == int(row["run"][-1])
        assert int(row["decoder_layers"]) == cfg.model.num_decoder_layers
        tokens = 4 * cfg.train.batch_size * cfg.model.seq_length
        expected = flops.training_flops_per_token(cfg.model).masked * tokens
        assert float(row["train_flops"]) == pytest.approx(expected)
        assert float(row["sampling_tokens_per_s"]) > 0 and float(row["valid_nelbo"]) > 0
        assert float(row["valid_nelbo_eval_se"]) > 0  # summary.json keeps the evaluation's
    points = {p["point"]: p for p in csv.DictReader((results / "points.csv").open())}
    assert sorted(points) == ["dec1", "dec2", "dec4"]
    for name, point in points.items():
        mine = [float(r["valid_nelbo"]) for r in runs if r["point"] == name]
        assert int(point["runs"]) == 2 and float(point["valid_nelbo"]) == pytest.approx(
            sum(mine) / 2)
        assert float(point["valid_nelbo_se"]) > 0  # two seeds: a standard error
    params = [int(points[n]["non_embedding_params"]) for n in ("dec1", "dec2", "dec4")]
    assert params == sorted(params) and len(set(params)) == 3
    fits = {f["x"]: f for f in json.loads((results / "fits.json").read_text())}
    depth = fits["decoder_layers"]  # three points cannot identify three parameters
    assert depth["n"] == 3 and not depth["identified"] and "E" not in depth
    for stem in ("fit_decoder_layers", "pareto_sampling_flops", "pareto_tokens_per_s"):
        assert (results / f"{stem}.png").stat().st_size > 1000
        assert (results / f"{stem}.pdf").stat().st_size > 1000
    assert "6 done, 0 running, 0 pending, 0 stale, 0 failed" in e2d2("sweep", "status")

    # a run whose job ended without a finished run is failed (here: its run directory was
    # lost); re-running the sweep resubmits that run alone
    shutil.rmtree(out / "points" / "dec2-seed1")
    lines = e2d2("sweep", "status").splitlines()
    assert ["dec2-seed1", "failed"] in [line.split()[:2] for line in lines]
    second = e2d2("sweep", "submit")
    assert "5 done, 0 queued, 1 to submit" in second and "(dec2-seed1)" in second
    state = json.loads((out / "state.json").read_text())
    cluster.wait(state["points"]["dec2-seed1"]["job"], 1200)
    cluster.run("scancel", state["collect_job"])  # the first collect was checked above
    assert "6 done" in e2d2("sweep", "status")
    assert "all points are done" in e2d2("sweep", "submit")
