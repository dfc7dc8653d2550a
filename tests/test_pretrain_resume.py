"""``e2d2 pretrain`` survives preemption: real processes, killed and resumed.

* killed with ``kill -9`` after a checkpoint, a run resumed with ``--resume auto`` repeats
  the uninterrupted run's losses bitwise (one process, TP2, PP2 with one encoder and one
  decoder stage; bf16 on one process and on DP2 with the distributed optimizer);
* ``kill -9`` while a checkpoint is half written leaves the previous one, which resume uses;
* SIGTERM to every process of the run (as SLURM's ``--signal`` does) saves, exits with the
  preempted code, and the resumed run continues exactly; so does Ctrl-C (SIGINT to the
  launcher and every rank), with exit code 130;
* SIGTERM to the local launcher while the ranks start up exits with the preempted code and
  writes nothing;
* re-running a finished run says so and writes nothing;
* a user error found inside one rank while its peer waits in a collective is one line on the
  console, with exit code 2;
* a checkpoint resumes on another layout (TP1 -> TP2, PP2 -> PP1, and the distributed
  optimizer's state from DP2 to PP2) with the same losses; at another precision without the
  distributed optimizer it is refused with one message;
* switching ``parallel.use_distributed_optimizer`` on resume is refused with one message,
  before any load;
* a resume that raises ``train.steps`` past one epoch of the data repeats the straight run's
  losses bitwise, and one with another ``batch_size`` continues from the consumed samples;
* retention keeps the newest checkpoints of the current trajectory and moves those of an
  abandoned one aside;
* a NaN step is skipped and counted; repeated NaN steps abort the run;
* the same command under ``torchrun`` trains identically.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from pretrain_helpers import (
    make_data_dir,
    records,
    run_pretrain,
    start_pretrain,
    train_losses,
    wait_for,
    write_config,
)

from launchers.preemption import INTERRUPTED_EXIT_CODE, PREEMPTED_EXIT_CODE

pytestmark = pytest.mark.slow

STEPS = 8
LAYOUTS = {
    "single": (1, []),
    "tp2": (2, ["parallel.tensor_parallel=2"]),
    "pp2": (2, ["parallel.pipeline_parallel=2", "parallel.encoder_pipeline_stages=1"]),
    "dp2-distopt": (2, ["parallel.use_distributed_optimizer=true"]),
    "pp2-distopt": (2, ["parallel.pipeline_parallel=2", "parallel.encoder_pipeline_stages=1",
                        "parallel.use_distributed_optimizer=true"]),
    # The fp32 main weights (and moments) of megatron's mixed-precision optimizer and of the
    # distributed optimizer round-trip: bf16 weights alone would not repeat the run.
    "single-bf16": (1, ["train.precision=bf16"]),
    # An EMA (fp32, apart from the weights): the final evaluation reads it.
    "single-ema": (1, ["train.ema_decay=0.5"]),
    "dp2-distopt-bf16": (2, ["parallel.use_distributed_optimizer=true", "train.precision=bf16"]),
}
KILLED = ["single-ema", "tp2", "pp2", "single-bf16", "dp2-distopt-bf16"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    data = make_data_dir(root)
    # adam_eps as megatron_ext.verify.Run's: the resume on another layout compares losses
    # after Adam steps, and only a Lipschitz update keeps rounding-level gradient differences
    # (another summation order, another CPU) from growing into lr-sized steps.
    config = write_config(root / "tiny.yaml", train={"steps": STEPS, "adam_eps": 1e-3},
                          checkpoint={"interval": 2, "keep": 10})
    return root, data, config


@pytest.fixture(scope="module")
def straight(setup):
    """Uninterrupted runs, one per layout, made on first use."""
    root, data, config = setup
    done = {}

    def get(layout: str):
        if layout not in done:
            nproc, parallel = LAYOUTS[layout]
            run_dir = root / f"straight-{layout}"
            result = run_pretrain(config, f"run.dir={run_dir}", f"data.path={data}", *parallel,
                                  nproc=nproc)
            assert result.returncode == 0, result.stderr
            assert "predicted forward FLOPs: stage 0 " in result.stderr  # the start-up shares
            losses = train_losses(run_dir)
            assert sorted(losses) == list(range(1, STEPS + 1))
            done[layout] = run_dir
        return done[layout]

    return get


def _args(run_dir, data, layout):
    return [f"run.dir={run_dir}", f"data.path={data}", *LAYOUTS[layout][1]]


@pytest.mark.parametrize("layout", KILLED)
def test_resume_after_kill_9_repeats_the_losses_bitwise(layout, setup, straight, tmp_path):
    _, data, config = setup
    reference = train_losses(straight(layout))
    run_dir = tmp_path / "killed"
    nproc = LAYOUTS[layout][0]
    # held after its first checkpoint (step 2), so the kill always lands mid-run
    proc = start_pretrain(config, *_args(run_dir, data, layout), nproc=nproc,
                          env={"E2D2_FAULTS": "hold@2"})
    latest = run_dir / "checkpoints" / "latest"
    wait_for(latest.is_file, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed_from = int(latest.read_text().strip().removeprefix("iter_"))
    assert resumed_from == 2
    result = run_pretrain(config, *_args(run_dir, data, layout), nproc=nproc, resume="auto")
    assert result.returncode == 0, result.stderr
    assert f"resumed from {latest.parent / f'iter_{resumed_from:07d}'}" in result.stderr
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))  # records after the checkpoint replaced
    for step in range(resumed_from + 1, STEPS + 1):
        assert losses[step] == reference[step], (step, losses[step], reference[step])
    # the final evaluation: the weights, or the EMA where one is kept, resumed exactly
    assert _final_nelbo(run_dir) == _final_nelbo(straight(layout))


def _final_nelbo(run_dir: Path) -> float:
    return [r["nelbo"] for r in records(run_dir) if "nelbo" in r][-1]


def test_kill_9_during_a_checkpoint_write_keeps_the_previous_one(setup, straight, tmp_path):
    _, data, config = setup
    reference = train_losses(straight("single"))
    run_dir = tmp_path / "torn"
    result = run_pretrain(config, *_args(run_dir, data, "single"),
                          env={"E2D2_FAULTS": "kill_in_save@4"})
    assert result.returncode == -signal.SIGKILL
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "iter_0000004.partial").is_dir()  # the torn write
    assert (checkpoints / "latest").read_text().strip() == "iter_0000002"
    result = run_pretrain(config, *_args(run_dir, data, "single"))
    assert result.returncode == 0, result.stderr
    assert "resumed from" in result.stderr and "iter_0000002" in result.stderr
    assert not (checkpoints / "iter_0000004.partial").exists()
    losses = train_losses(run_dir)
    assert [losses[s] for s in range(3, STEPS + 1)] == [reference[s] for s in range(3, STEPS + 1)]


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(setup, straight, tmp_path):
    _, data, config = setup
    reference = train_losses(straight("single"))
    run_dir = tmp_path / "corrupt"
    result = run_pretrain(config, *_args(run_dir, data, "single"), "train.steps=4")
    assert result.returncode == 0, result.stderr
    # A complete-looking checkpoint whose shard files were truncated (a bad disk, a bad copy).
    for shard in (run_dir / "checkpoints" / "iter_0000004").glob("*.distcp"):
        shard.write_bytes(shard.read_bytes()[:100])
    # As if it stopped before its summary: a finished run is not trained again.
    (run_dir / "summary.json").unlink()
    result = run_pretrain(config, *_args(run_dir, data, "single"), "train.steps=4")
    assert result.returncode == 0, result.stderr
    assert "iter_0000004 could not be loaded" in result.stderr
    assert "falling back" in result.stderr and "resumed from" in result.stderr
    losses = train_losses(run_dir)
    assert losses[3] == reference[3] or losses[3] is not None


@pytest.mark.parametrize("sig,code,said", [
    (signal.SIGTERM, PREEMPTED_EXIT_CODE, "preempted at step 2; checkpoint saved"),
    # A Ctrl-C in the terminal reaches the launcher and each rank once, as killpg does.
    (signal.SIGINT, INTERRUPTED_EXIT_CODE, "interrupted (Ctrl-C) at step 2; checkpoint saved"),
])
def test_a_stop_signal_saves_exits_and_the_run_continues_exactly(sig, code, said, setup,
                                                                 straight, tmp_path):
    _, data, config = setup
    reference = train_losses(straight("tp2"))
    run_dir = tmp_path / "stopped"
    args = _args(run_dir, data, "tp2")
    # Held after the first checkpoint (so that dist_checkpointing's helper processes exist)
    # until the signal: a tiny run would otherwise finish before it arrives.
    proc = start_pretrain(config, *args, nproc=2, env={"E2D2_FAULTS": "hold@2"})
    wait_for((run_dir / "checkpoints" / "latest").is_file, proc)
    # To every process of the run, as SLURM signals a job step: the launcher (which forwards
    # SIGTERM), both ranks, and the helpers dist_checkpointing spawns to write the checkpoint.
    os.killpg(proc.pid, sig)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == code, out
    assert said in out
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "iter_0000002"
    result = run_pretrain(config, *args, nproc=2)
    assert result.returncode == 0, result.stderr
    assert train_losses(run_dir) == reference


def test_rerunning_a_finished_run_says_so_and_writes_nothing(setup, straight, tmp_path):
    _, data, config = setup
    run_dir = tmp_path / "finished"
    shutil.copytree(straight("single"), run_dir)
    written = {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()}
    for steps in (STEPS, STEPS // 2):
        result = run_pretrain(config, *_args(run_dir, data, "single"), f"train.steps={steps}")
        assert result.returncode == 0, result.stderr
        assert f"already finished at step {STEPS}" in result.stderr
        assert {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()} == written


def test_a_stop_signal_during_start_up_exits_preempted_and_writes_nothing(setup, tmp_path):
    _, data, config = setup
    run_dir = tmp_path / "startup"
    # Held once the world is up, before the model and data are built, until the signal.
    proc = start_pretrain(config, *_args(run_dir, data, "tp2"), nproc=2,
                          env={"E2D2_FAULTS": "hold@startup"})
    # Once the launcher has started ranks its handlers are in place; the ranks may be anywhere
    # in their own start-up, the interpreter's included.
    wait_for(lambda: psutil.Process(proc.pid).children(), proc)
    proc.send_signal(signal.SIGTERM)  # the launcher alone: it forwards the signal
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == PREEMPTED_EXIT_CODE, out
    assert "preempted during the start-up; no step taken, nothing half-written" in out
    assert not run_dir.exists()


def test_a_user_error_inside_one_rank_is_one_line_and_exit_2(setup, straight, tmp_path):
    _, data, config = setup
    checkpoint = straight("single") / "checkpoints" / "iter_0000004"
    # A decoder one layer deeper than the checkpoint's: only the decoder stage (rank 1) finds
    # the missing tensor, while rank 0 waits for it in a collective.
    result = run_pretrain(config, *_args(tmp_path / "deeper", data, "pp2"),
                          f"checkpoint.init={checkpoint}", "model.num_decoder_layers=2", nproc=2)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("error:") == 1, result.stderr
    assert "has no tensor 'decoder_layers.1." in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("source,target", [("single", "tp2"), ("pp2", "single"),
                                           ("dp2-distopt", "pp2-distopt")])
def test_resume_on_another_layout_continues_with_the_same_losses(source, target, setup, straight,
                                                                 tmp_path):
    _, data, config = setup
    reference = train_losses(straight(source))
    checkpoint = straight(source) / "checkpoints" / "iter_0000004"
    run_dir = tmp_path / f"{source}-to-{target}"
    result = run_pretrain(config, *_args(run_dir, data, target), nproc=LAYOUTS[target][0],
                          resume=str(checkpoint))
    assert result.returncode == 0, result.stderr
    assert "resharded" in result.stderr
    losses = train_losses(run_dir)
    for step in range(5, STEPS + 1):
        assert abs(losses[step] - reference[step]) < 1e-5, (step, losses[step], reference[step])


def test_resume_at_another_precision_is_one_clear_error_without_the_distributed_optimizer(
        setup, straight, tmp_path):
    _, data, config = setup
    checkpoint = straight("single-bf16") / "checkpoints" / "iter_0000004"
    result = run_pretrain(config, *_args(tmp_path / "fp32", data, "single"), resume=str(checkpoint))
    assert result.returncode == 2
    assert "was saved with train.precision=bf16, this run has train.precision=fp32" in result.stderr


@pytest.mark.parametrize("source,target", [("single", "dp2-distopt"), ("dp2-distopt", "single")])
def test_switching_the_distributed_optimizer_on_resume_is_one_clear_error(source, target, setup,
                                                                         straight, tmp_path):
    _, data, config = setup
    checkpoint = straight(source) / "checkpoints" / "iter_0000004"
    result = run_pretrain(config, *_args(tmp_path / "switched", data, target),
                          nproc=LAYOUTS[target][0], resume=str(checkpoint))
    assert result.returncode == 2, result.stderr
    saved, now = ("false", "true") if source == "single" else ("true", "false")
    assert (f"was saved with parallel.use_distributed_optimizer={saved}, this run has {now}"
            in result.stderr)
    assert f"checkpoint.init={checkpoint} and --resume none" in result.stderr
    assert "could not be loaded" not in result.stderr  # refused before any load


def test_resume_past_an_epoch_repeats_the_straight_run_and_a_new_batch_size_continues(
        setup, tmp_path):
    """The data order does not depend on train.steps: a run of 3 steps extended to 10 (past
    two epochs of a small corpus) trains on the samples of a straight 10-step run."""
    config = setup[2]
    data = make_data_dir(tmp_path, documents=30)  # 10 training documents: 139 samples, 4 steps
    # constant LR: the first segment's schedule is then the straight run's
    common = [f"data.path={data}", "train.batch_size=32", "train.lr_decay=constant",
              "checkpoint.keep=10"]
    straight_dir, extended_dir = tmp_path / "straight", tmp_path / "extended"
    result = run_pretrain(config, f"run.dir={straight_dir}", *common, "train.steps=10")
    assert result.returncode == 0, result.stderr
    result = run_pretrain(config, f"run.dir={extended_dir}", *common, "train.steps=3")
    assert result.returncode == 0, result.stderr
    result = run_pretrain(config, f"run.dir={extended_dir}", *common, "train.steps=10")
    assert result.returncode == 0, result.stderr
    assert train_losses(extended_dir) == train_losses(straight_dir)
    # Another batch size continues from the 96 consumed samples (not a multiple of 40).
    batch_dir = tmp_path / "batch40"
    result = run_pretrain(config, f"run.dir={batch_dir}", *common, "train.steps=5",
                          "train.batch_size=40",
                          resume=str(extended_dir / "checkpoints" / "iter_0000003"))
    assert result.returncode == 0, result.stderr
    summary = json.loads((batch_dir / "summary.json").read_text())
    assert summary["tokens"] == (3 * 32 + 2 * 40) * 32


def test_retention_keeps_the_new_trajectory_and_moves_the_abandoned_one_aside(
        setup, straight, tmp_path):
    _, data, config = setup
    run_dir = tmp_path / "branched"
    shutil.copytree(straight("single"), run_dir)  # checkpoints of steps 2, 4, 6, 8
    checkpoints = run_dir / "checkpoints"
    result = run_pretrain(config, *_args(run_dir, data, "single"), "train.steps=5",
                          "checkpoint.keep=1", resume=str(checkpoints / "iter_0000004"))
    assert result.returncode == 0, result.stderr
    assert "moved iter_0000008, iter_0000006 to" in result.stderr
    assert sorted(p.name for p in checkpoints.iterdir()) == ["abandoned", "iter_0000005", "latest"]
    assert (checkpoints / "latest").read_text().strip() == "iter_0000005"
    assert sorted(p.name for p in (checkpoints / "abandoned").iterdir()) == [
        "iter_0000006", "iter_0000008"]
    result = run_pretrain(config, *_args(run_dir, data, "single"), "train.steps=6",
                          "checkpoint.keep=1", resume="auto")
    assert result.returncode == 0, result.stderr
    assert f"resumed from {checkpoints / 'iter_0000005'} at step 5" in result.stderr
    assert (checkpoints / "latest").read_text().strip() == "iter_0000006"


def test_nan_steps_are_skipped_counted_and_abort_when_repeated(setup, tmp_path):
    _, data, config = setup
    run_dir = tmp_path / "nan"
    result = run_pretrain(config, *_args(run_dir, data, "single"), "train.steps=4",
                          env={"E2D2_FAULTS": "nan@2"})
    assert result.returncode == 0, result.stderr
    by_step = {r["step"]: r for r in records(run_dir) if "loss" in r}
    assert by_step[2]["skipped"] and by_step[2]["loss"] is None and by_step[2]["grad_norm"] is None
    assert not by_step[3]["skipped"] and by_step[3]["loss"] is not None
    assert by_step[4]["skipped_total"] == 1
    run_dir = tmp_path / "nan-abort"
    result = run_pretrain(config, *_args(run_dir, data, "single"), "train.steps=6",
                          "train.max_consecutive_skips=2", env={"E2D2_FAULTS": "nan@2,nan@3"})
    assert result.returncode == 1
    assert "2 consecutive steps had non-finite loss" in result.stderr


def test_torchrun_runs_the_same_training_as_the_local_launcher(setup, straight, tmp_path):
    """``torchrun --standalone --nproc-per-node 2 $(which e2d2) pretrain ...``: the same
    command under torchrun's rendezvous gives the same losses, bitwise."""
    _, data, config = setup
    reference = train_losses(straight("tp2"))
    run_dir = tmp_path / "torchrun"
    e2d2 = Path(sys.executable).parent / "e2d2"  # the console script, as `which e2d2` finds it
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(e2d2), "pretrain", str(config), *_args(run_dir, data, "tp2")],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stderr
    assert train_losses(run_dir) == reference
