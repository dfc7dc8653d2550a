"""Two "hosts" on one machine (network namespaces joined by a veth pair): one rank in each,
launched by torchrun with rendezvous at the first host's address, train a PP2 step."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from infra.netns import two_hosts

from megatron_ext.testing import free_port

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")


def test_pp2_step_across_two_hosts_with_encoder_and_decoder_stages():
    with two_hosts() as (first, second):
        port = free_port()
        procs = []
        for node_rank, host in enumerate((first, second)):
            command = host.command([
                TORCHRUN, "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", node_rank,
                "--master-addr", first.name, "--master-port", port,
                ROOT / "tests" / "infra" / "step_worker.py", "--pp", "2", "--encoder-stages", "1"])
            procs.append(subprocess.Popen(command, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True, cwd=ROOT))
        outputs = []
        for proc in procs:
            try:
                out, _ = proc.communicate(timeout=600)
            finally:
                proc.kill()
            outputs.append(out)
            assert proc.returncode == 0, out[-4000:]
    results = [json.loads(line[len("RESULT "):]) for out in outputs
               for line in out.splitlines() if line.startswith("RESULT ")]
    by_rank = {r["rank"]: r for r in results}
    assert sorted(by_rank) == [0, 1]
    # each rank ran in its own host, found by name, and gloo used that host's veth
    assert by_rank[0]["peers"] == [[0, first.name], [1, second.name]]
    assert by_rank[0]["master"] == by_rank[1]["master"] == f"{first.name}:{port}"
    assert (by_rank[0]["gloo_ifname"], by_rank[1]["gloo_ifname"]) == (first.interface,
                                                                      second.interface)
    layout = by_rank[0]["layout"]
    assert f"2 host(s): {first.name}, {second.name}" in layout
    assert "pipeline stage 0: ranks [0]: encoder layers" in layout
    assert "pipeline stage 1: ranks [1]: decoder layers" in layout
    # the pipelined steps match the single-process reference
    assert by_rank[0]["mismatches"] == []
    assert by_rank[0]["losses"] == pytest.approx(by_rank[0]["reference_losses"], abs=1e-5)
