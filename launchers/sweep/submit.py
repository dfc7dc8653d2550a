"""``e2d2 sweep submit``: one job per point (an sbatch array or separate jobs), then a collect
job with ``--dependency=afterok``; or ``--local``, the points in turn on this machine.

Re-running skips runs that are done or still queued/running and resubmits the failed
ones (and the never submitted); their training resumes from its latest checkpoint
(``--resume auto``). A stale run (trained on a config the spec no longer resolves to) has its
run directory moved to ``OUTPUT/stale/<run>-<time>`` and is run again from scratch. Every job
runs ``e2d2 pretrain`` on the run's resolved config and then the sampling benchmark
(``e2d2 sweep bench RUN_DIR``).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from e2d2 import flops
from e2d2.errors import UserError
from launchers.config import save_run_config
from launchers.submit import (
    config_env,
    e2d2_command,
    environment_setup,
    job_setup,
    render_pretrain,
    require_sbatch,
    sbatch,
    validate_data,
    write_text_atomic,
)
from launchers.sweep.spec import Point, SweepSpec
from launchers.sweep.status import (
    SUMMARY_FILE,
    PointStatus,
    read_state,
    sweep_status,
    write_state,
)


def training_flops(point: Point) -> float:
    """The run's training FLOPs (``e2d2.flops``), before it runs."""
    cfg = point.config
    tokens = cfg.train.steps * cfg.train.batch_size * cfg.model.seq_length
    return flops.training_flops_per_token(cfg.model).masked * tokens


def to_submit(statuses: list[PointStatus]) -> list[Point]:
    return [s.point for s in statuses if s.state in ("failed", "stale") or not s.submitted]


def set_aside_stale(spec: SweepSpec, statuses: list[PointStatus], stamp: str) -> list[str]:
    """Move each stale run directory to ``OUTPUT/stale/`` (kept, never deleted)."""
    messages = []
    for status in statuses:
        if status.state == "stale":
            target = spec.output / "stale" / f"{status.point.name}-{stamp}"
            target.parent.mkdir(parents=True, exist_ok=True)
            status.point.run_dir.rename(target)
            messages.append(f"{status.point.name}: {status.detail}; moved to {target}")
    return messages


def _check_data(points: list[Point]) -> None:
    """The data of the points that will train (not of those trained already)."""
    validate_data([p.config for p in points if not (p.run_dir / SUMMARY_FILE).is_file()])


def _commands(spec: SweepSpec, point: Point) -> tuple[list[str], list[str]]:
    config = spec.output / "configs" / f"{point.name}.yaml"
    train = [*e2d2_command(), "pretrain", str(config), "--resume", "auto"]
    return train, [*e2d2_command(), "sweep", "bench", str(point.run_dir)]


def _write_point_files(spec: SweepSpec, points: list[Point]) -> None:
    """Each point's resolved config, and the bash lines its job sources (``jobs/INDEX.sh``,
    indexed like array tasks)."""
    for point in points:
        save_run_config(point.config, spec.output / "configs" / f"{point.name}.yaml")
        train, after = _commands(spec, point)
        # a point trained already (only its benchmark is missing) is not trained again
        skip = f'[ -f "$RUN_DIR/{SUMMARY_FILE}" ] && TRAIN=(true)'
        write_text_atomic(spec.output / "jobs" / f"{point.index}.sh",
                          job_setup(point.run_dir, train, after) + f"\n{skip}\n")


def _point_scripts(spec: SweepSpec, points: list[Point]) -> list[tuple[str, str | None]]:
    """``(script, array)``: one array script, or one script per point."""
    logs, jobs = spec.output / "logs", spec.output / "jobs"
    if spec.array:
        setup = f'source "{jobs}/${{SLURM_ARRAY_TASK_ID}}.sh"'
        array = ",".join(str(p.index) for p in points)
        env = {k: v for p in points for k, v in config_env(p.config).items()}  # any point's
        return [(render_pretrain(f"sweep-{spec.name}", spec.resources,
                                 str(logs / "%x-%A_%a.log"), setup, array=array, env=env), array)]
    return [(render_pretrain(f"sweep-{spec.name}-{p.name}", spec.resources,
                             str(logs / "%x-%j.log"), f'source "{jobs}/{p.index}.sh"',
                             env=config_env(p.config)), None)
            for p in points]


def _collect_options(spec: SweepSpec, wait_for: list[str]) -> list[str]:
    """sbatch's options for the collect job. With an ``eval`` section it runs every run's
    evaluations, so it gets the points' time limit and, on a GPU cluster, the GPUs of one
    evaluation (``eval.nproc_per_node``); the points' ``setup`` prepares its shell too."""
    options = [f"--job-name=sweep-{spec.name}-collect", "--ntasks=1",
               f"--time={spec.resources.time if spec.evals.enabled else '01:00:00'}",
               f"--output={spec.output / 'logs' / '%x-%j.log'}"]
    if spec.evals.enabled and spec.resources.gpus_per_node:
        options.append(f"--gpus-per-node={spec.evals.nproc_per_node}")
    if wait_for:
        options.append("--dependency=afterok:" + ":".join(sorted({j.split("_")[0]
                                                                  for j in wait_for})))
    if spec.resources.partition:
        options.append(f"--partition={spec.resources.partition}")
    if spec.resources.account:
        options.append(f"--account={spec.resources.account}")
    collect = shlex.join([*e2d2_command(), "sweep", "collect", str(spec.path)])
    setup = environment_setup(spec.resources, {})
    if setup:  # `source` and the setup's own syntax are bash's; --wrap runs sh
        collect = shlex.join(["bash", "-c", f"{setup}\n{collect}"])
    return [*options, f"--wrap={collect}"]


def submit_slurm(spec: SweepSpec, dry_run: bool = False) -> list[str]:
    """Submit what is not done or queued; return the messages to print."""
    if not dry_run:
        require_sbatch()
    statuses = sweep_status(spec)
    points = to_submit(statuses)
    try:
        _check_data(points)
    except UserError as exc:
        if not dry_run:
            raise
        print(f"warning: {exc} (a real submit stops here)")  # scripts can be read before data
    queued = [s for s in statuses if s.state in ("pending", "running") and s.submitted]
    messages = [f"{len(statuses) - len(points) - len(queued)} done, {len(queued)} queued, "
                f"{len(points)} to submit"]
    if not points and not queued:
        messages.append(f"all points are done: e2d2 sweep collect {spec.path}")
        return messages
    scripts = _point_scripts(spec, points) if points else []
    if dry_run:
        return messages + [script for script, _ in scripts] + [
            "sbatch " + shlex.join(_collect_options(spec, ["<point jobs>"]))]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    messages += set_aside_stale(spec, statuses, stamp)
    _write_point_files(spec, points)
    (spec.output / "logs").mkdir(parents=True, exist_ok=True)  # sbatch does not create it
    state = read_state(spec)
    new_jobs = []
    by_index = {p.index: p for p in points}
    for n, (script, array) in enumerate(scripts):
        path = spec.output / "slurm" / f"points-{stamp}-{n}.sbatch"
        write_text_atomic(path, script)
        job = sbatch(str(path))
        if array is not None:
            ids = {by_index[int(i)].name: f"{job}_{i}" for i in array.split(",")}
        else:
            ids = {points[n].name: job}
        for name, job_id in ids.items():
            state["points"][name] = {"job": job_id, "submitted": stamp}
            new_jobs.append(job_id)
        messages.append(f"submitted job {job} ({', '.join(ids)})")
    wait_for = new_jobs + [read_state(spec)["points"][s.point.name]["job"] for s in queued]
    collect = sbatch(*_collect_options(spec, wait_for))
    state["collect_job"] = collect
    write_state(spec, state)
    messages.append(f"collect job {collect} runs after {len(wait_for)} point job(s); "
                    f"results in {spec.results_dir}")
    return messages


def submit_local(spec: SweepSpec, jobs: int = 1) -> list[str]:
    """Run the runs that are not done on this machine, ``jobs`` at a time; then collect."""
    from launchers.sweep.collect import collect

    statuses = sweep_status(spec)
    # the cheapest first: an interrupted sweep has whole small budgets, every depth in them
    points = sorted((s.point for s in statuses if s.state != "done"), key=training_flops)
    _check_data(points)
    messages = set_aside_stale(spec, statuses, time.strftime("%Y%m%d-%H%M%S"))
    world = spec.resources.world_size
    _write_point_files(spec, points)
    lock = threading.Lock()  # state.json is read, changed and written by one run at a time

    def record(name: str, entry: dict) -> None:
        with lock:
            state = read_state(spec)
            state["points"][name] = state["points"].get(name, {}) | entry
            write_state(spec, state)

    def run(point: Point) -> str:
        record(point.name, {"job": "local", "pid": os.getpid(), "rc": None})
        train, after = _commands(spec, point)
        if world > 1:
            train += ["--nproc-per-node", str(world)]
        print(f"sweep {spec.name}: run {point.name} ({point.index + 1}/{len(spec.points)})",
              flush=True)
        trained = (point.run_dir / SUMMARY_FILE).is_file()
        rc = 0 if trained else subprocess.run(train).returncode
        if rc == 0:
            rc = subprocess.run(after).returncode
        record(point.name, {"rc": rc})
        return f"run {point.name}: exit code {rc}"

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        messages += list(pool.map(run, points))
    messages.append(collect(spec)[0])
    return messages
