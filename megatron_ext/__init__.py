"""megatron-core engine for E2D2 and its baselines (see docs/parallel.md).

``layout`` (ParallelConfig, PipelinePlan), ``groups`` (megatron_layout: the parallel state
of a layout), ``model`` (build_chunks), ``engine`` (build_engine: chunks, weights and
wrapping, one way for every caller), ``objective``
(noised_batch, micro_batches, make_forward_step), ``training`` (wrap_ddp, build_optimizer,
train_step), ``mapping`` (reference-model conversion), ``checkpoint`` (dist_checkpointing),
``cpu_compat`` (CPU/gloo patches), ``optimizer_fixes`` (distributed-optimizer load bugs), ``testing`` (spawn_gloo, counted_all_reduces).
"""
