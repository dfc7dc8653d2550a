"""One training step with megatron-core's DDP, optimizer and pipeline schedules.

Model-agnostic: anything that megatron's schedules accept (a list of model chunks
and a ``forward_step_func``) trains through ``train_step``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer import TransformerConfig

from megatron_ext.layout import ParallelConfig


def wrap_ddp(
    chunks: list[torch.nn.Module], config: TransformerConfig, parallel: ParallelConfig
) -> list[DistributedDataParallel]:
    """Wrap model chunks in megatron's DDP (fp32 grad buffers, mean over data-parallel ranks)."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
    )
    # The schedules call this after the last micro-batch; without it the DP, sequence-parallel
    # and tied-embedding gradient reductions never run.
    config.finalize_model_grads_func = finalize_model_grads
    return [
        DistributedDataParallel(config, ddp_config, chunk, disable_bucketing=index > 0)
        for index, chunk in enumerate(chunks)
    ]


def build_optimizer(
    chunks: list[DistributedDataParallel], parallel: ParallelConfig, **adam: float
) -> MegatronOptimizer:
    """megatron's Adam (torch AdamW on CPU) with fp32 params; ``adam`` overrides OptimizerConfig."""
    config = OptimizerConfig(
        optimizer="adam",
        use_distributed_optimizer=parallel.use_distributed_optimizer,
        **adam,
    )
    return get_megatron_optimizer(config, chunks)


def train_step(
    chunks: list[torch.nn.Module],
    optimizer: MegatronOptimizer | None,
    forward_step_func: Callable,
    micro_batches: Sequence[Any],
    *,
    seq_length: int,
    micro_batch_size: int,
) -> float | None:
    """Forward and backward over this data-parallel rank's ``micro_batches`` and, with an
    optimizer, one update.

    ``forward_step_func(data_iterator, model)`` draws one micro-batch per call; with
    interleaved chunks every chunk gets its own iterator over the same micro-batches, as
    megatron's interleaved schedule expects. Its loss function must return
    ``(loss, {"loss": detached})`` with ``loss`` the micro-batch mean.
    ``seq_length`` is the length of the inter-stage tensor ``[seq_length, micro_batch_size,
    hidden]``. Returns the mean loss over micro-batches and data-parallel ranks on the last
    pipeline stage, ``None`` elsewhere. Without an optimizer the gradients stay in
    ``param.main_grad`` for inspection.
    """
    for chunk in chunks:
        chunk.zero_grad_buffer()
    if optimizer is not None:
        optimizer.zero_grad()
    iterators = [iter(micro_batches) for _ in chunks]
    losses = get_forward_backward_func()(
        forward_step_func=forward_step_func,
        data_iterator=iterators if len(chunks) > 1 else iterators[0],
        model=chunks,
        num_microbatches=len(micro_batches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=False,
    )
    if optimizer is not None:
        succeeded, _, _ = optimizer.step()
        if not succeeded:
            raise FloatingPointError("optimizer step skipped: non-finite gradients")
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    loss = torch.stack([item["loss"] for item in losses]).mean()
    torch.distributed.all_reduce(loss, group=parallel_state.get_data_parallel_group())
    return (loss / parallel_state.get_data_parallel_world_size()).item()
