"""launchers.world: every launcher's environment becomes the same World; a bad rendezvous is one
clear error, not a hang; the layout report names each rank's stage and groups."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from e2d2.errors import UserError
from launchers.world import World, discover_world, single_reason, slurm_master_port
from megatron_ext.groups import megatron_layout
from megatron_ext.layout import ParallelConfig, PipelinePlan
from megatron_ext.testing import spawn_gloo
from megatron_ext.verify import tiny_model_config

ROOT = Path(__file__).resolve().parents[1]


def test_torchrun_variables():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node7",
           "MASTER_PORT": "29400"}
    assert discover_world(env) == World(3, 8, 1, "node7", 29400, "torchrun")


def test_torchrun_wins_over_slurm_when_torchrun_runs_inside_srun():
    env = {"RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "5", "MASTER_ADDR": "a",
           "MASTER_PORT": "1234", "SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0"}
    assert discover_world(env).source == "torchrun"


def test_srun_step_variables_and_the_port_from_the_job_id():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0",
           "SLURM_JOB_NODELIST": "gpu017", "SLURM_JOB_ID": "123456"}
    world = discover_world(env)
    assert world == World(5, 8, 1, "gpu017", slurm_master_port(123456), "slurm")
    assert world.master_port == 20000 + 123456 % 10000


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="scontrol (slurm-client) not installed")
def test_a_compressed_node_list_is_expanded_by_scontrol(tmp_path, monkeypatch):
    # `scontrol show hostnames` is pure string work, but scontrol wants some slurm.conf
    (tmp_path / "slurm.conf").write_text("ClusterName=test\nSlurmctldHost=localhost\n")
    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "slurm.conf"))
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_LOCALID": "0", "SLURM_STEP_ID": "0",
           "SLURM_JOB_NODELIST": "gpu[007-008,010],cpu1", "MASTER_PORT": "29000"}
    assert discover_world(env).master_addr == "gpu007"


def test_the_sbatch_script_itself_is_not_a_rank_of_its_job():
    """SLURM sets SLURM_PROCID=0 and SLURM_NTASKS=N in the batch script too; without srun
    (no SLURM_STEP_ID) it must not wait for N-1 peers that will never come."""
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "77",
           "SLURM_JOB_NODELIST": "n1"}
    world = discover_world(env)
    assert (world.world_size, world.source) == (1, "single")
    assert "not in an srun step" in single_reason(env)


def test_open_mpi_and_pmi_variables():
    ompi = {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4",
            "OMPI_COMM_WORLD_LOCAL_RANK": "0", "MASTER_ADDR": "h0"}
    assert discover_world(ompi) == World(2, 4, 0, "h0", 29500, "mpi")
    pmi = {"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MASTER_ADDR": "h0",
           "MASTER_PORT": "4000"}
    assert discover_world(pmi) == World(1, 2, 1, "h0", 4000, "mpi")


def test_nothing_is_a_world_of_one_and_says_so():
    world = discover_world({})
    assert (world.rank, world.world_size, world.source) == (0, 1, "single")
    assert "no torchrun, SLURM (srun) or MPI environment" in single_reason({})


@pytest.mark.parametrize("env, fragment", [
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "rank 2 of world size 2"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "70000"}, "MASTER_PORT=70000"),
])
def test_inconsistent_variables_are_one_clear_error(env, fragment):
    with pytest.raises(UserError, match=fragment):
        discover_world(env)


MPIRUN = shutil.which("mpirun", path=str(Path(sys.executable).parent)) or shutil.which("mpirun")


def test_a_world_of_one_leaves_the_environment_as_it_found_it():
    # A process that starts a world of one in-process (e2d2 sample, eval, a test) and later
    # launches srun or mpirun must not hand its children a torchrun world of one. A fresh
    # interpreter: this test process may hold a world already.
    code = ("import os, torch; before = dict(os.environ); "
            "from launchers.world import init_world, world_of_one; "
            "init_world(world_of_one('local')); assert torch.distributed.get_world_size() == 1; "
            "print(sorted(set(os.environ.items()) ^ set(before.items())))")
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


@pytest.mark.slow
@pytest.mark.skipif(MPIRUN is None, reason="mpirun not found (pip install 'e2d2[mpi]')")
def test_mpirun_ranks_find_rank_0_host_through_mpi4py():
    code = ("from launchers.world import discover_world; import socket; w = discover_world(); "
            "print(w.rank, w.world_size, w.source, w.master_addr == socket.gethostname())")
    env = os.environ | {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    done = subprocess.run([MPIRUN, "-n", "2", "--oversubscribe", sys.executable, "-c", code],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(done.stdout.split("\n")[:2]) == ["0 2 mpi True", "1 2 mpi True"]


_INIT = """
import sys
from e2d2.errors import UserError
from launchers.world import World, init_world
try:
    init_world(World({rank}, 2, 0, {addr!r}, {port}, "torchrun"), timeout_s={timeout})
except UserError as exc:
    print("error:", exc, file=sys.stderr)
    sys.exit(2)
"""


@pytest.mark.slow
def test_unreachable_master_addr_is_a_clear_timeout_not_a_hang():
    from megatron_ext.testing import free_port

    port = free_port()  # nothing listens there: the store's connection attempts are refused
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", _INIT.format(rank=1, addr="127.0.0.1",
                                                                port=port, timeout=3)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    seconds = time.monotonic() - start
    assert done.returncode == 2, done.stderr[-2000:]
    message = done.stderr.strip().splitlines()[-1]
    assert f"no rendezvous at MASTER_ADDR=127.0.0.1:{port} within 3 s" in message
    assert seconds < 60


def test_unresolvable_master_addr_fails_at_once():
    from launchers.world import init_world

    with pytest.raises(UserError, match="MASTER_ADDR='no-such-host.invalid' does not resolve"):
        init_world(World(1, 2, 0, "no-such-host.invalid", 29500, "torchrun"), timeout_s=5)


def _layout_body(rank: int) -> list[str]:
    from launchers.world import describe_layout

    cfg = tiny_model_config("e2d2", num_layers=3, num_decoder_layers=2)
    texts = []
    for parallel in (ParallelConfig(2, pipeline_parallel=2, encoder_pipeline_stages=1),
                     ParallelConfig(2, tensor_parallel=2, precision="bf16", recompute="full")):
        plan = PipelinePlan(cfg, parallel)
        with megatron_layout(parallel, get_embedding_ranks=plan.get_embedding_ranks):
            texts.append(describe_layout(plan))
    return texts


@pytest.mark.slow
def test_layout_report_names_stages_groups_and_devices():
    per_rank = spawn_gloo(_layout_body, 2)
    assert per_rank[0] == per_rank[1]  # every rank gets the same report
    pipeline, tensor = per_rank[0]
    assert "layout tp1-pp2-dp1-enc1 (e2d2) on 2 ranks" in pipeline
    assert ("precision: fp32 (weights, activations, gradients, optimizer); recompute none; "
            "overlapped nothing\n") in pipeline
    assert ("precision: bf16 weights and activations, fp32 gradient buffers, main weights, "
            "Adam moments and loss; recompute full") in tensor
    assert "pipeline stage 0: ranks [0]: encoder layers 0-2\n" in pipeline
    assert "pipeline stage 1: ranks [1]: decoder layers 0-1, embeds xt, LM head" in pipeline
    assert "tensor-parallel groups: [0] [1]" in pipeline
    assert "rank 1: " in pipeline and "cpu (pp 1, tp 0, dp 0)" in pipeline
    assert "pipeline stage 0: ranks [0, 1]: encoder layers 0-2, decoder layers 0-1" in tensor
    assert "tensor-parallel groups: [0, 1]" in tensor
    assert "data-parallel groups: [0] [1]" in tensor
    assert "cpu (pp 0, tp 1, dp 0)" in tensor
