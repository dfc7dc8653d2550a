"""slurm/ templates and `e2d2 submit`: what is rendered, and bad input refused before submitting."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from pretrain_helpers import make_data_dir, write_config

from e2d2.errors import ConfigError
from launchers.cli import main
from launchers.preemption import PREEMPTED_EXIT_CODE
from launchers.submit import Resources, job_setup, render_pretrain

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_data_dir(tmp_path_factory.mktemp("data"), documents=40)


@pytest.fixture(scope="module")
def tiny(data, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "tiny.yaml"
    return write_config(path, data={"path": str(data)})


@pytest.fixture
def _submit(capsys, tiny):
    def submit(*args: str) -> tuple[int, str, str]:
        code = main(["submit", str(tiny), *args])
        out = capsys.readouterr()
        return code, out.out, out.err

    return submit


def test_dry_run_prints_a_valid_script_for_nodes_x_gpus(_submit, tmp_path):
    code, script, _ = _submit(f"run.dir={tmp_path / 'run1'}", "--nodes", "4",
                              "--gpus-per-node", "8", "--time", "12:00:00", "--partition", "h100",
                              "--account", "lm", "--dry-run")
    assert code == 0
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --time=12:00:00", "#SBATCH --partition=h100", "#SBATCH --account=lm",
                 "#SBATCH --signal=USR1@120", "#SBATCH --requeue", "#SBATCH --open-mode=append",
                 f"#SBATCH --output={tmp_path / 'slurm-logs'}/run1-%j.log"):
        assert line + "\n" in script
    assert f'if [ "$rc" -eq {PREEMPTED_EXIT_CODE} ]' in script
    assert 'scontrol requeue "${SLURM_JOB_ID}"' in script
    assert "# export NCCL_IB_HCA=" in script  # the InfiniBand knobs ship commented
    assert "{{" not in script
    assert f"RUN_DIR={tmp_path / 'run1'}" in script
    assert f"run.dir={tmp_path / 'run1'}" in script.split("TRAIN=(")[1].split(")")[0]
    # the run directory is printed before anything else runs
    body = script[script.index("set -uo pipefail"):]
    assert body.index('echo "run directory: ${RUN_DIR}"') < body.index("srun ")
    assert not (tmp_path / "slurm-logs").exists()  # a dry run writes nothing
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0


def test_cpu_jobs_ask_for_no_gpus():
    text = render_pretrain("t", Resources(gpus_per_node=0, tasks_per_node=2), "log-%j",
                           job_setup(Path("/r"), ["true"]))
    assert "--gpus-per-node" not in text and "#SBATCH --ntasks-per-node=2" in text


@pytest.mark.parametrize("args, fragment", [
    (["--time", "soon"], "time 'soon' is not a SLURM time limit"),
    (["--nodes", "0"], "nodes must be >= 1"),
    (["parallel.tensor_parallel=2", "--gpus-per-node", "1"],
     "layout on 1 ranks: world size 1 is not divisible"),
    (["model.hidden_sizee=3"], "unknown key 'hidden_sizee' in [model]"),
    (["train.steps"], "expected section.key=value"),
    (["data.path=/nonexistent/data"], "data.path /nonexistent/data does not exist"),
    (["model.vocab_size=100", "model.mask_token_id=99"], "vocab"),
])
def test_bad_submit_input_is_one_error_before_submitting(_submit, tmp_path, args, fragment):
    code, out, err = _submit(f"run.dir={tmp_path / 'r'}", *args)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and fragment in err and len(err.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())


def test_missing_sbatch_is_one_error_and_nothing_is_written(tmp_path, tiny):
    env = {"PATH": str(Path(sys.executable).parent), "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "launchers.cli", "submit", str(tiny),
                           f"run.dir={tmp_path / 'r'}",
                           "--gpus-per-node", "0"],
                          env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2, done.stderr
    assert "error: sbatch is not on PATH" in done.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_preprocess_template_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(ROOT / "slurm" / "preprocess.sbatch")]).returncode == 0


def test_sweep_submit_without_sbatch_fails_before_anything_is_written(tmp_path, data):
    base = write_config(tmp_path / "tiny.yaml", data={"path": str(data)})
    spec = tmp_path / "sweep.yaml"
    spec.write_text(yaml.safe_dump({"base": str(base), "output": str(tmp_path / "sweep"),
                                    "grid": {"decoder_layers": [1]}}))
    env = {"PATH": str(Path(sys.executable).parent), "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "launchers.cli", "sweep", "submit", str(spec)],
                          env=env, capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2 and "error: sbatch is not on PATH" in done.stderr
    assert not (tmp_path / "sweep").exists()


def test_gpu_jobs_get_whole_nodes_and_cpus_per_rank(_submit, tmp_path):
    """Without --cpus-per-task SLURM gives each rank one CPU (OMP_NUM_THREADS=1, no room for
    data workers): GPU jobs take whole nodes and share their CPUs among the ranks."""
    code, script, _ = _submit(f"run.dir={tmp_path / 'r'}", "--dry-run")
    assert code == 0
    assert "#SBATCH --exclusive\n" in script and "#SBATCH --mem=0\n" in script
    assert 'srun --wait=120 --cpus-per-task="$CPUS_PER_TASK"' in script
    code, script, _ = _submit(f"run.dir={tmp_path / 'r'}", "--cpus-per-task", "12", "--mem",
                              "480G", "--no-exclusive", "--dry-run")
    assert "#SBATCH --cpus-per-task=12\n" in script and "#SBATCH --mem=480G\n" in script
    assert "#SBATCH --exclusive" not in script
    cpu = render_pretrain("t", Resources(gpus_per_node=0), "log", job_setup(Path("/r"), ["true"]))
    assert "#SBATCH --exclusive" not in cpu and "#SBATCH --mem" not in cpu
    with pytest.raises(ConfigError, match="not a SLURM memory size"):
        Resources(mem="lots")


def test_setup_file_is_sourced_and_a_command_runs_before_srun(_submit, tmp_path):
    env_file = tmp_path / "env.sh"
    env_file.write_text("module load cuda\n")
    for setup, line in ((str(env_file), f"source {env_file}"),
                        ("module load cuda/12.4 && source ~/venv/bin/activate",
                         "module load cuda/12.4 && source ~/venv/bin/activate")):
        code, script, _ = _submit(f"run.dir={tmp_path / 'r'}", "--setup", setup, "--dry-run")
        assert code == 0
        assert f"\n{line} || " in script
        assert script.index(line) < script.index("srun ")


def test_overlapping_configs_export_cuda_device_max_connections(_submit, tmp_path):
    code, script, _ = _submit(f"run.dir={tmp_path / 'r'}", "--dry-run")
    assert "\nexport CUDA_DEVICE_MAX_CONNECTIONS" not in script
    code, script, _ = _submit(f"run.dir={tmp_path / 'r'}", "parallel.overlap_grad_reduce=true",
                              "--dry-run")
    assert code == 0
    assert script.index("\nexport CUDA_DEVICE_MAX_CONNECTIONS=1\n") < script.index("srun ")


def test_fp8_config_submits_from_a_login_node_without_transformer_engine(capsys, tmp_path):
    from megatron_ext.layout import transformer_engine_available

    if transformer_engine_available():
        pytest.skip("Transformer Engine is installed here")
    code = main(["submit", str(ROOT / "configs" / "h100-1b-e2d2.yaml"), "--nodes", "2",
                 f"run.dir={tmp_path / 'r'}", "data.path=/nonexistent", "--dry-run"])
    err = capsys.readouterr().err
    # the layout passes; only the data (absent here) stops it, after the TE warning
    assert "compute nodes need transformer-engine" in err
    assert "layout" not in err and "data.path /nonexistent does not exist" in err
    assert code == 2


def test_sigterm_to_the_batch_shell_reaches_the_ranks_and_requeues(tmp_path):
    """SLURM's preemption SIGTERMs the batch shell too: it must pass the signal on and live
    to requeue the job, not die with srun still running."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(
        f"#!/bin/bash\necho \"$@\" > {tmp_path}/srun-args\n"
        f"trap 'kill $!; echo term > {tmp_path}/ranks-got; exit {PREEMPTED_EXIT_CODE}' TERM\n"
        f"sleep 60 >/dev/null & touch {tmp_path}/running; wait\n")
    (bin_dir / "scontrol").write_text(f"#!/bin/bash\necho \"$@\" > {tmp_path}/scontrol\n")
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    script = tmp_path / "job.sbatch"
    script.write_text(render_pretrain("t", Resources(gpus_per_node=0, tasks_per_node=2), "log",
                                      job_setup(tmp_path / "run", ["true"])))
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "n1",
           "SLURM_NNODES": "1", "SLURM_NTASKS": "2", "SLURM_CPUS_ON_NODE": "16",
           "SLURM_NTASKS_PER_NODE": "2"}
    shell = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (tmp_path / "running").exists():
        assert time.monotonic() < deadline and shell.poll() is None
        time.sleep(0.05)
    shell.send_signal(signal.SIGTERM)
    out, _ = shell.communicate(timeout=60)
    assert shell.returncode == 0, out
    assert (tmp_path / "ranks-got").read_text() == "term\n"
    assert (tmp_path / "scontrol").read_text() == "requeue 77\n"
    assert "--cpus-per-task=8" in (tmp_path / "srun-args").read_text()
