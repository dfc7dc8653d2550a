"""One training step with megatron-core's DDP, optimizer and pipeline schedules.

Model-agnostic: anything that megatron's schedules accept (a list of model chunks
and a ``forward_step_func``) trains through ``train_step``.

The wrapping is megatron's own (its ``training.get_model`` order): each chunk in
``Float16Module`` when ``config.bf16`` (bf16 compute, fp32 logits out of the last stage),
then in megatron's DDP (fp32 gradient buffers, optionally overlapped reduction); the
optimizer keeps fp32 main parameters (``Float16OptimizerWithFloat16Params`` or the
distributed optimizer). The unwrapped stages stay the caller's handles for the name
mapping and checkpoints (``megatron_ext.mapping``, ``megatron_ext.checkpoint``): the
wrappers hold the same Parameter objects.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import Float16Module

from e2d2.config import TrainConfig
from megatron_ext.groups import any_rank, collective_device
from megatron_ext.layout import ParallelConfig


def wrap_ddp(
    chunks: list[torch.nn.Module], config: TransformerConfig, parallel: ParallelConfig
) -> list[DistributedDataParallel]:
    """Wrap model chunks in megatron's ``Float16Module`` (with ``config.bf16``) and DDP (fp32
    grad buffers, mean over data-parallel ranks), and give ``config`` the hooks megatron's
    ``training.py`` gives the schedules."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
        overlap_grad_reduce=parallel.overlap_grad_reduce,
        overlap_param_gather=parallel.overlap_param_gather,
        # With several chunks the interleaved schedule dispatches each chunk's all-gather
        # (param_sync_func below); otherwise each forward pre-hook dispatches the next bucket.
        align_param_gather=parallel.overlap_param_gather and len(chunks) > 1,
    )
    # The schedules call this after the last micro-batch; without it the DP, sequence-parallel
    # and tied-embedding gradient reductions never run.
    config.finalize_model_grads_func = finalize_model_grads
    wrapped = [
        DistributedDataParallel(config, ddp_config, Float16Module(config, chunk) if config.bf16
                                else chunk, disable_bucketing=index > 0)
        for index, chunk in enumerate(chunks)
    ]
    _set_sync_funcs(config, wrapped, ddp_config)
    return wrapped


def _set_sync_funcs(config: TransformerConfig, chunks: list[DistributedDataParallel],
                    ddp_config: DistributedDataParallelConfig) -> None:
    """megatron's ``training.py`` (0.16.1, default ``align_grad_reduce``): with overlapped
    reduction the schedules keep DDP from reducing before the last micro-batch
    (``no_sync_func``) and, interleaved, start each chunk's reduction when its last backward
    is done (``grad_sync_func``); with aligned overlapped all-gathers they start each chunk's
    (``param_sync_func``). One function for one chunk, a list for several."""
    def per_chunk(method: str):
        funcs = [getattr(chunk, method) for chunk in chunks]
        return funcs[0] if len(funcs) == 1 else funcs

    config.no_sync_func = config.grad_sync_func = config.param_sync_func = None
    if ddp_config.overlap_grad_reduce:
        config.no_sync_func = per_chunk("no_sync")
        config.grad_sync_func = per_chunk("start_grad_sync")
    if ddp_config.overlap_param_gather and ddp_config.align_param_gather:
        config.param_sync_func = per_chunk("start_param_sync")


def sync_params(chunks: list[DistributedDataParallel]) -> None:
    """Finish the parameter all-gather now. With ``overlap_param_gather`` the distributed
    optimizer's step leaves the updated parameters in its shards and the next forward
    gathers them (DDP's forward pre-hooks), so anything that reads the weights between steps
    (evaluation, checkpoints, the EMA, ``gather_reference_state``) calls this first, as
    megatron's ``training.py`` forces a sync before saving. A no-op otherwise."""
    for chunk in chunks:
        if chunk.ddp_config.overlap_param_gather:
            chunk.start_param_sync(force_sync=True)


def enable_tf32() -> None:
    """TF32 for fp32 matmuls and cuDNN convolutions on Ampere and later (what remains in fp32
    under bf16: nothing large; under fp32: everything). No effect on CPU."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def build_optimizer(
    chunks: list[DistributedDataParallel], parallel: ParallelConfig, **adam: float
) -> MegatronOptimizer:
    """megatron's Adam (torch AdamW on CPU); ``adam`` overrides OptimizerConfig. With
    ``parallel.bf16`` it is megatron's mixed-precision optimizer: fp32 main parameters (and
    Adam moments) updated from the fp32 gradient buffers, then copied into the bf16 weights;
    no loss scaling (bf16 has fp32's exponent range)."""
    config = OptimizerConfig(
        optimizer="adam",
        use_distributed_optimizer=parallel.use_distributed_optimizer,
        bf16=parallel.bf16,
        params_dtype=torch.bfloat16 if parallel.bf16 else torch.float32,
        **adam,
    )
    return get_megatron_optimizer(config, chunks)


def build_training_optimizer(chunks: list[DistributedDataParallel], parallel: ParallelConfig,
                             train: TrainConfig) -> tuple[MegatronOptimizer, OptimizerParamScheduler]:
    """megatron's Adam with ``train``'s settings and its ``OptimizerParamScheduler``: linear
    warm-up from 0, then ``train.lr_decay`` to ``min_lr_ratio x lr`` at ``train.steps``.
    Weight decay skips norms (megatron's default rule for 1-D parameters)."""
    optimizer = build_optimizer(
        chunks, parallel, lr=train.lr, min_lr=train.lr * train.min_lr_ratio,
        weight_decay=train.weight_decay, adam_beta1=train.betas[0], adam_beta2=train.betas[1],
        adam_eps=train.adam_eps,
        clip_grad=train.grad_clip)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=train.lr, min_lr=train.lr * train.min_lr_ratio,
        lr_warmup_steps=train.warmup_steps,
        lr_decay_steps=max(train.steps, train.warmup_steps + 1),  # megatron needs warm-up < decay
        lr_decay_style=train.lr_decay, start_wd=train.weight_decay, end_wd=train.weight_decay,
        wd_incr_steps=train.steps, wd_incr_style="constant")
    return optimizer, scheduler


@dataclass(frozen=True)
class StepResult:
    """One optimizer step, the same on every rank."""

    loss: float  # mean over micro-batches and data-parallel ranks (NaN if non-finite)
    grad_norm: float | None  # before clipping; None when skipped
    skipped: bool  # non-finite loss or gradients: no update was made


def _forward_backward(chunks, forward_step_func, micro_batches, seq_length, micro_batch_size,
                      forward_only=False) -> list[dict]:
    iterators = [iter(micro_batches) for _ in chunks]
    return get_forward_backward_func()(
        forward_step_func=forward_step_func,
        data_iterator=iterators if len(chunks) > 1 else iterators[0],
        model=chunks,
        num_microbatches=len(micro_batches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )


def last_stage_sum(values: torch.Tensor) -> torch.Tensor:
    """``values`` of the last pipeline stage summed over its data-parallel ranks (once per
    TP and context-parallel group: their ranks hold the same whole-sequence losses), on every
    rank of the world: the last stage computes losses, rank 0 logs them. Collective over the
    world; float64."""
    contributes = (parallel_state.is_pipeline_last_stage(ignore_virtual=True)
                   and parallel_state.get_tensor_model_parallel_rank() == 0
                   and parallel_state.get_context_parallel_rank() == 0)
    out = values.double() if contributes else torch.zeros_like(values, dtype=torch.float64)
    torch.distributed.all_reduce(out)
    return out


def _nonfinite_grads(chunks: list[torch.nn.Module]) -> bool:
    """Whether any rank holds a non-finite gradient (collective over the world). One
    device-to-host sync for all parameters, not one each."""
    finite = [torch.isfinite(p.main_grad).all()
              for chunk in chunks for p in chunk.parameters() if p.requires_grad]
    return any_rank(bool(finite) and not bool(torch.stack(finite).all()))


def forward_only(chunks: list[torch.nn.Module], forward_step_func: Callable,
                 micro_batches: Sequence[Any], *, seq_length: int, micro_batch_size: int
                 ) -> list[dict]:
    """The loss functions' outputs for every micro-batch, on the last pipeline stage (empty
    elsewhere), without gradients: evaluation through the same schedules."""
    with torch.no_grad():
        return _forward_backward(chunks, forward_step_func, micro_batches, seq_length,
                                 micro_batch_size, forward_only=True)


def train_step(
    chunks: list[torch.nn.Module],
    optimizer: MegatronOptimizer | None,
    forward_step_func: Callable,
    micro_batches: Sequence[Any],
    *,
    seq_length: int,
    micro_batch_size: int,
) -> StepResult:
    """Forward and backward over this data-parallel rank's ``micro_batches`` and, with an
    optimizer, one update, skipped (and reported) if the loss or any gradient is non-finite
    on any rank: megatron's fp32 optimizers would clip a NaN norm into the weights. Without
    an optimizer the gradients stay in ``param.main_grad`` for inspection. Collective over
    the world.

    ``forward_step_func(data_iterator, model)`` draws one micro-batch per call; with
    interleaved chunks every chunk gets its own iterator over the same micro-batches, as
    megatron's interleaved schedule expects. Its loss function must return
    ``(loss, {"loss": detached})`` with ``loss`` the micro-batch mean.
    ``seq_length`` is the length of the inter-stage tensor ``[seq_length, micro_batch_size,
    hidden]``. The result's loss is the mean over micro-batches and data-parallel ranks of
    the last pipeline stage, on every rank.
    """
    for chunk in chunks:
        chunk.zero_grad_buffer()
    if optimizer is not None:
        optimizer.zero_grad()
    losses = _forward_backward(chunks, forward_step_func, micro_batches, seq_length,
                               micro_batch_size)
    local = (torch.stack([item["loss"] for item in losses]).mean().reshape(1) if losses
             else torch.zeros(1, device=collective_device()))
    loss = (last_stage_sum(local) / parallel_state.get_data_parallel_world_size()).item()
    if optimizer is None:
        return StepResult(loss, None, False)
    if not torch.isfinite(torch.tensor(loss)) or _nonfinite_grads(chunks):
        return StepResult(float("nan"), None, True)
    succeeded, grad_norm, _ = optimizer.step()
    if not succeeded:
        return StepResult(loss, None, True)
    return StepResult(loss, None if grad_norm is None else float(grad_norm), False)
