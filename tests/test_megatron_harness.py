"""The gloo harness returns per-rank results in rank order, surfaces a rank's traceback,
and hides CUDA from its workers."""

from __future__ import annotations

import pytest
import torch

from megatron_ext.groups import megatron_layout
from megatron_ext.layout import ParallelConfig
from megatron_ext.testing import WorkerError, spawn_gloo


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


def _cuda_seen(rank: int) -> tuple[str | None, bool]:
    import os

    return os.environ.get("CUDA_VISIBLE_DEVICES"), torch.cuda.is_available()


@pytest.mark.slow
def test_workers_never_see_cuda():
    import os

    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    assert spawn_gloo(_cuda_seen, 1) == [("", False)]
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == before  # the parent's is restored
