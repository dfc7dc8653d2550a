"""The gloo harness returns per-rank results in rank order and surfaces a rank's traceback."""

from __future__ import annotations

import pytest
import torch

from megatron_ext.layout import ParallelConfig
from megatron_ext.testing import WorkerError, megatron_layout, spawn_gloo


def _tp_sum(rank: int) -> tuple[int, float]:
    from megatron.core import parallel_state

    with megatron_layout(ParallelConfig(2, tensor_parallel=2)):
        value = torch.tensor([float(rank + 1)])
        torch.distributed.all_reduce(value, group=parallel_state.get_tensor_model_parallel_group())
        return parallel_state.get_tensor_model_parallel_rank(), value.item()


def _fails_on_rank_one(rank: int) -> int:
    if rank == 1:
        raise ValueError("rank one is broken")
    return rank


@pytest.mark.slow
def test_results_in_rank_order():
    assert spawn_gloo(_tp_sum, 2) == [(0, 3.0), (1, 3.0)]


@pytest.mark.slow
def test_worker_error_carries_traceback():
    with pytest.raises(WorkerError, match="rank 1:(.|\n)*rank one is broken"):
        spawn_gloo(_fails_on_rank_one, 2)
