"""megatron-core's parallel state for one layout on the live process group.

``megatron_layout`` creates megatron's tensor / pipeline / context / data-parallel groups for a
`megatron_ext.layout.ParallelConfig` (which only does the arithmetic) and destroys them on
exit; the training loop, the exporter, the profiler, ``megatron_ext.verify`` and the tests
run their engines inside it. ``collective_device`` and ``any_rank`` serve the small
collectives of the loop (flags, sums) on either backend.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from megatron_ext.layout import ParallelConfig


@contextlib.contextmanager
def megatron_layout(
    layout: ParallelConfig,
    seed: int = 1234,
    get_embedding_ranks: Callable[[list[int]], list[int]] | None = None,
) -> Iterator[ParallelConfig]:
    """Initialise megatron's parallel state for ``layout`` on the live gloo world, then tear down.

    ``get_embedding_ranks`` chooses the pipeline ranks that hold a copy of the word
    embedding (megatron's default: first and last stage).
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if layout.world_size != torch.distributed.get_world_size():
        raise ValueError(
            f"layout is for world size {layout.world_size}, "
            f"the process group has {torch.distributed.get_world_size()}"
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tensor_parallel,
        pipeline_model_parallel_size=layout.pipeline_parallel,
        virtual_pipeline_model_parallel_size=layout.virtual_pipeline,
        context_parallel_size=layout.context_parallel,
        get_embedding_ranks=get_embedding_ranks,
    )
    model_parallel_cuda_manual_seed(seed)
    try:
        yield layout
    finally:
        parallel_state.destroy_model_parallel()


def collective_device() -> torch.device:
    """Where a tensor for a collective on the default group must live: the current GPU
    under NCCL, which takes no CPU tensors; the CPU under gloo."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on any rank of the world (collective)."""
    out = torch.tensor([float(flag)], device=collective_device())
    torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.MAX)
    return bool(out.item())
