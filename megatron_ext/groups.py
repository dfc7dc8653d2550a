"""megatron-core's parallel state for one layout on the live process group.

``megatron_layout`` creates megatron's tensor / pipeline / data-parallel groups for a
`megatron_ext.layout.ParallelConfig` (which only does the arithmetic) and destroys them on
exit; the training loop, the exporter, the profiler, ``megatron_ext.verify`` and the tests
run their engines inside it.
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
        get_embedding_ranks=get_embedding_ranks,
    )
    model_parallel_cuda_manual_seed(seed)
    try:
        yield layout
    finally:
        parallel_state.destroy_model_parallel()
