"""The parallel model: the reference model's layers and forward, built from megatron-core layers.

Each (virtual) pipeline stage is one ``ParallelDiffusionLM`` with the layers
``PipelinePlan`` gives it; a rank holds one, or ``virtual_pipeline`` chunks. The layer math is the reference's own (``e2d2.layers``): the parallel classes
subclass the reference ones and only swap their linears for megatron-core's
column/row-parallel linears with per-rank head counts, so both engines run one forward.
q/k/v and gate/up are fused into one column-parallel linear each (``linear_qkv``,
``linear_fc1``, megatron's layouts; the reference hooks ``qkv_projections`` and
``kv_projections`` split the first, ``ParallelMLP`` feeds the second to a SwiGLU whose
backward needs no ``cat``), so TP all-reduces one input gradient per fused linear; ``megatron_ext.mapping.FUSIONS`` maps them to the reference names.

Which column/row-parallel linears (``linear_classes``), by ``ParallelConfig.transformer_impl``:
megatron-core's local ``ColumnParallelLinear``/``RowParallelLinear`` (CPU, the tested path)
or Transformer Engine's ``TEColumnParallelLinear``/``TERowParallelLinear`` (same weight
shapes and names, so ``megatron_ext.mapping`` and checkpoints are unchanged). Norms,
attention and RoPE stay the reference's torch code under both. With ``fp8`` set each
stage's forward runs inside megatron's ``get_fp8_context`` (``fp8_context``). The TE/FP8
path has not been run here (no TE, no GPU): see docs/parallel.md.

Inter-stage tensor (what megatron's schedules send between stages), ``[T, batch, hidden]``:

* E2D2: ``T = 2L``, ``[encoder stream ; decoder stream]``. Encoder stages update the first
  half and pass the second through (zeros until the first decoder stage embeds ``xt``, or,
  with the interleaved schedule, ``embed(xt)`` from stage 0: see ``megatron_ext.layout``);
  decoder stages read the first half (``h_enc``, already through the encoder norm) and
  update only the second.
* BD3-LM: ``T = 2L``, the ``[x0 ; xt]`` stack. MDLM, AR: ``T = L``.

Inside a stage hidden states are ``[batch, T, hidden]`` like the reference.

Sequence parallelism (``ParallelConfig.sequence_parallel``): outside the linears each TP
rank holds a contiguous ``1/TP`` slice of every stream's positions (E2D2 slices its two
streams separately, BD3-LM its ``[x0 ; xt]`` stack as one), so norms and residuals run on
``[batch, T / TP, hidden]`` and the inter-stage tensor is ``[T / TP, batch, hidden]``.
megatron's column-parallel linears all-gather the positions on input and the row-parallel
ones reduce-scatter them on output (along dim 0, hence the transposes in ``_Column``/
``_Row``); attention itself always sees whole sequences.

Precision (``ParallelConfig.precision``): with bf16 (and fp8) the chunks are built in bf16
(``TransformerConfig.params_dtype``) and ``megatron_ext.training.wrap_ddp`` wraps each in
megatron's ``Float16Module``, which returns fp32 logits on the last stage; norms reduce in
fp32 inside torch's ``rms_norm``, SDPA accumulates its softmax in fp32.

Activation recomputation (``ParallelConfig.recompute``, megatron's
``TransformerConfig.recompute_granularity``): megatron's ``tensor_parallel.checkpoint`` (RNG
states saved and restored, megatron's tracker included) around each layer (``"full"``) or
around the core attention ``softmax(q k^T) v`` (``"selective"``), in training only.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.enums import ModelType
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    checkpoint,
    scatter_to_sequence_parallel_region,
    set_tensor_model_parallel_attributes,
)
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule
from torch import nn

from e2d2 import masks, shift
from e2d2.attention import attend, build_mask
from e2d2.config import ModelConfig
from e2d2.layers import MLP, Attention, TransformerLayer, rotary, run_layers
from megatron_ext.context import ContextSplit, gather_kv
from megatron_ext.layout import ParallelConfig, PipelinePlan, StageLayers
from megatron_ext.mapping import param_maps


def transformer_config(model: ModelConfig, parallel: ParallelConfig) -> TransformerConfig:
    """megatron's TransformerConfig for the parallel linears, DDP and the schedules (CPU init;
    fp32, or bf16 parameters and inter-stage tensors with ``parallel.bf16``)."""
    dtype = torch.bfloat16 if parallel.bf16 else torch.float32
    full = parallel.recompute == "full"
    return TransformerConfig(
        num_layers=model.num_layers + model.num_decoder_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.kv_channels,
        # finalize_model_grads sums q/k-norm gradients over TP ranks (each rank sees some heads).
        qk_layernorm=model.qk_layernorm,
        tensor_model_parallel_size=parallel.tensor_parallel,
        context_parallel_size=parallel.context_parallel,
        sequence_parallel=parallel.sequence_parallel,
        pipeline_model_parallel_size=parallel.pipeline_parallel,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline,
        # Which linears the attention/MLP use (see linear_classes) and, with TE, FP8.
        transformer_impl=parallel.transformer_impl,
        fp8=parallel.fp8_format if parallel.fp8 else None,
        fp8_recipe=parallel.fp8_recipe,  # ignored while fp8 is None
        bf16=parallel.bf16,
        params_dtype=dtype,
        # Every layer is one recompute unit (megatron's "uniform" method, one layer each);
        # "selective" recomputes the core attention (megatron's default recompute_modules).
        recompute_granularity=None if parallel.recompute == "none" else parallel.recompute,
        recompute_method="uniform" if full else None,
        recompute_num_layers=1 if full else None,
        # gloo pairs messages between two ranks in posting order. In a batched exchange of the
        # interleaved schedule a rank sends to its previous and its next stage, the same peer
        # when PP=2, and the two tensors can swap; megatron's unbatched p2p path keeps the order.
        batch_p2p_comm=_backend() != "gloo",
        pipeline_dtype=dtype,
        # Weights come from megatron_ext.mapping.initialize_at_seed (layout-invariant, per
        # shard); megatron's own init would depend on the layout. Only shards are allocated.
        perform_initialization=False,
        use_cpu_initialization=True,
        gradient_accumulation_fusion=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )


def _backend() -> str | None:
    return torch.distributed.get_backend() if torch.distributed.is_initialized() else None


def _sequence_first(linear_forward, x: torch.Tensor, **kwargs) -> torch.Tensor:
    """Run a megatron linear on batch-first ``x``; with sequence parallelism megatron gathers
    or scatters positions along dim 0, so it gets (and returns) sequence-first tensors."""
    return linear_forward(x.transpose(0, 1).contiguous(), **kwargs)[0].transpose(0, 1)


class _ColumnOutput:
    """Column-parallel linear that returns only its output, like ``nn.Linear``:
    ``[b, s (/ TP with sequence parallelism), in] -> [b, s, out / TP]``. Mixed into
    megatron's local ``ColumnParallelLinear`` or TE's ``TEColumnParallelLinear``
    (``linear_classes``); extra ``forward`` kwargs (``weight=``) reach the local one only."""

    def __init__(self, in_features: int, out_features: int, config: TransformerConfig, **kwargs):
        super().__init__(in_features, out_features, config=config, init_method=None, bias=False,
                         gather_output=False, skip_bias_add=False, is_expert=False, **kwargs)

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        if self.config.sequence_parallel:
            return _sequence_first(super().forward, x, **kwargs)
        return super().forward(x, **kwargs)[0]


class _RowOutput:
    """Row-parallel linear that returns only its output:
    ``[b, s, in / TP] -> [b, s (/ TP with sequence parallelism), out]``. Mixed into
    ``RowParallelLinear`` or ``TERowParallelLinear``."""

    def __init__(self, in_features: int, out_features: int, config: TransformerConfig):
        super().__init__(in_features, out_features, config=config, init_method=None, bias=False,
                         input_is_parallel=True, skip_bias_add=False, is_expert=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.sequence_parallel:
            return _sequence_first(super().forward, x)
        return super().forward(x)[0]


class _Column(_ColumnOutput, ColumnParallelLinear):
    pass


class _Row(_RowOutput, RowParallelLinear):
    pass


@functools.cache
def _te_linears() -> tuple[type, type]:
    # Imported only here: without TE the extensions module builds its classes on a MagicMock.
    from megatron.core.extensions.transformer_engine import (
        TEColumnParallelLinear,
        TERowParallelLinear,
    )

    class _TEColumn(_ColumnOutput, TEColumnParallelLinear):
        pass

    class _TERow(_RowOutput, TERowParallelLinear):
        pass

    return _TEColumn, _TERow


def linear_classes(config: TransformerConfig) -> tuple[type, type]:
    """The (column, row) parallel linears for the attention and MLP projections, by
    ``config.transformer_impl``: megatron-core's local layers or Transformer Engine's
    (what megatron's own TE layer spec uses for these projections). The tied/untied LM
    head always uses the local column linear, as megatron's GPTModel output layer does:
    TE's linears cannot take the embedding weight at call time."""
    if config.transformer_impl == "transformer_engine":
        return _te_linears()
    return _Column, _Row


def fp8_context(config: TransformerConfig):
    """megatron's FP8 autocast (``megatron.core.fp8_utils.get_fp8_context``: the recipe from
    ``config.fp8_recipe``/``fp8``/``fp8_margin``/``fp8_amax_*``, amax reduced over
    megatron's amax group) when ``config.fp8`` is set; a no-op context otherwise."""
    if not config.fp8:
        return contextlib.nullcontext()
    from megatron.core.fp8_utils import get_fp8_context

    return get_fp8_context(config)


def _split_groups(fused: torch.Tensor, groups: int, sizes: tuple[int, ...], head_dim: int) -> tuple[torch.Tensor, ...]:
    """``[..., groups * sum(sizes) * head_dim]``, each group holding ``sizes`` heads in order
    (megatron's ``get_query_key_value_tensors``) -> one view ``[..., groups, size, head_dim]``
    per size, ``[..., groups, head_dim]`` where the size is 1."""
    parts = fused.unflatten(-1, (groups, sum(sizes), head_dim)).split(sizes, dim=-2)
    return tuple(p.squeeze(-2) if n == 1 else p for p, n in zip(parts, sizes, strict=True))


class ParallelAttention(Attention):
    """The reference attention with this rank's ``heads / TP`` query heads and ``groups / TP``
    KV heads, q/k/v fused into one column-parallel ``linear_qkv`` in megatron's layout
    (``megatron_ext.mapping.FUSIONS``: per query group its q heads, its k head, its v head),
    so the backward all-reduces the input gradient once instead of three times. Q/K norms
    are named ``q_layernorm``/``k_layernorm`` because that is how megatron's
    ``finalize_model_grads`` finds the replicated weights whose gradients it must sum over
    TP ranks."""

    def __init__(self, cfg: ModelConfig, config: TransformerConfig):
        nn.Module.__init__(self)
        self.config = config
        tp, d = config.tensor_model_parallel_size, cfg.kv_channels
        h, g = cfg.num_attention_heads, cfg.num_query_groups
        self.heads, self.groups, self.head_dim = h // tp, g // tp, d
        column, row = linear_classes(config)
        self.linear_qkv = column(cfg.hidden_size, (h + 2 * g) * d, config)
        # K/V of another stream (E2D2's h_enc): the local linear applied to the k|v rows of
        # linear_qkv's weight (it owns no weight), one all-reduce and no q FLOPs. Where that
        # cannot work kv_projections runs linear_qkv and drops q: TE's linears take no weight
        # at call time, and megatron's fused wgrad accumulation writes to the weight's
        # main_grad, which a slice of it has not.
        slice_works = config.transformer_impl == "local" and not config.gradient_accumulation_fusion
        self.linear_kv = (_Column(cfg.hidden_size, 2 * g * d, config, skip_weight_param_allocation=True)
                          if slice_works else None)
        self.o_proj = row(h * d, cfg.hidden_size, config)
        norm = (lambda: nn.RMSNorm(d, eps=cfg.norm_eps)) if cfg.qk_layernorm else nn.Identity
        self.q_layernorm, self.k_layernorm = norm(), norm()

    @property
    def q_norm(self) -> nn.Module:
        return self.q_layernorm

    @property
    def k_norm(self) -> nn.Module:
        return self.k_layernorm

    def core_attention(self, q, k, v, mask) -> torch.Tensor:
        """``recompute="selective"``: the attention scores are recomputed in the backward pass
        instead of kept (the mask, never differentiated, stays out of the checkpoint's inputs).
        With context parallelism the keys and values (prefix and own) of the whole CP group
        are gathered first (``megatron_ext.context``): the mask holds their columns."""
        if self.config.context_parallel_size > 1:
            k, v = gather_kv(k), gather_kv(v)
        if self.config.recompute_granularity != "selective" or not torch.is_grad_enabled():
            return attend(q, k, v, mask)
        return checkpoint(lambda q, k, v: attend(q, k, v, mask), False, q, k, v)

    def qkv_projections(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _split_groups(self.linear_qkv(x), self.groups, (self.heads // self.groups, 1, 1), self.head_dim)

    def kv_projections(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.linear_kv is None:  # the fused linear, q discarded (see __init__)
            return self.qkv_projections(x)[1:]
        q_rows = self.heads // self.groups * self.head_dim
        kv_weight = self.linear_qkv.weight.unflatten(0, (self.groups, -1))[:, q_rows:].flatten(0, 1)
        return _split_groups(self.linear_kv(x, weight=kv_weight), self.groups, (1, 1), self.head_dim)


class _SwiGLU(torch.autograd.Function):
    """``silu(gate) * up`` of a fused ``[..., 2 ffn]`` (gate | up) -> ``[..., ffn]``, the
    reference MLP's math with the same ops, whose backward writes both halves' gradients
    straight into one ``[..., 2 ffn]`` tensor. Autograd through ``chunk`` would compute them
    apart and ``cat`` them (a copy of the fc1 output's size per layer; on CPU it made the
    fused engine slower than the unfused one at TP1). Gradients are bitwise autograd's
    (``tests/test_megatron_fused.py``). It keeps what autograd would (the fc1 output and
    ``silu(gate)``): recomputing ``silu(gate)`` in the backward cost an extra pass over it,
    1% of a CPU step; ``parallel.recompute`` is the way to trade that time for memory."""

    @staticmethod
    def forward(ctx, fused: torch.Tensor) -> torch.Tensor:
        gate, up = fused.chunk(2, dim=-1)
        silu_gate = F.silu(gate)
        ctx.save_for_backward(fused, silu_gate)
        return silu_gate * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        fused, silu_gate = ctx.saved_tensors
        gate, up = fused.chunk(2, dim=-1)
        out = torch.empty_like(fused)
        grad_gate, grad_up = out.chunk(2, dim=-1)
        torch.mul(grad, silu_gate, out=grad_up)
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=grad_gate)
        return out


class ParallelMLP(MLP):
    """The reference SwiGLU with gate/up fused into one column-parallel ``linear_fc1`` (each
    rank ``[gate shard; up shard]``, megatron's SwiGLU layout) and a row-parallel down
    projection."""

    def __init__(self, cfg: ModelConfig, config: TransformerConfig):
        nn.Module.__init__(self)
        column, row = linear_classes(config)
        self.linear_fc1 = column(cfg.hidden_size, 2 * cfg.ffn_hidden_size, config)
        self.down_proj = row(cfg.ffn_hidden_size, cfg.hidden_size, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(_SwiGLU.apply(self.linear_fc1(x)))


class ParallelTransformerLayer(TransformerLayer):
    """The reference layer (same ``forward`` and ``kv``) over tensor-parallel attention and MLP."""

    def __init__(self, cfg: ModelConfig, config: TransformerConfig):
        nn.Module.__init__(self)
        self.config = config
        self.input_norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.attn = ParallelAttention(cfg, config)
        self.mlp_norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.mlp = ParallelMLP(cfg, config)

    def forward(self, x: torch.Tensor, rope, mask, prefix=None):
        """The reference layer; with ``recompute="full"`` (training only) under megatron's
        ``checkpoint``: only the layer's input is kept, everything inside is recomputed in the
        backward pass. The checkpoint takes tensors only, so the prefix K/V (differentiated)
        go in flat and the layer's own K/V come out flat; RoPE tables and mask (not
        differentiated) stay in the closure."""
        if self.config.recompute_granularity != "full" or not torch.is_grad_enabled():
            return super().forward(x, rope, mask, prefix)

        def run(x, *prefix_kv):
            out, (k, v) = TransformerLayer.forward(self, x, rope, mask, prefix_kv or None)
            return out, k, v

        out, k, v = checkpoint(run, False, x, *(prefix or ()))
        return out, (k, v)


class ParallelDiffusionLM(MegatronModule):
    """One pipeline stage of any variant. Parameter names follow the reference model's
    (``megatron_ext.mapping`` adds the stage's layer offsets).

    ``forward`` takes the micro-batch (``x0``, ``xt`` ``[batch, L]`` and optional
    ``attention_mask``/``context_mask``); on the last stage it returns vocab-parallel logits
    ``[batch, L, vocab / TP]`` of the predicted stream, elsewhere the inter-stage tensor.
    """

    def __init__(self, cfg: ModelConfig, plan: PipelinePlan, stage: int, config: TransformerConfig):
        super().__init__(config)
        self.cfg, self.plan, self.stage = cfg, plan, stage
        # The chunk index (megatron's name), read by Float16Module for first/last-stage casts.
        self.vp_stage = stage // plan.parallel.pipeline_parallel if plan.parallel.virtual_pipeline else None
        # Both streams travel in one tensor, so to megatron's schedules this is a plain
        # single-stack model (upstream's own encoder-decoder pipeline support was removed).
        self.model_type = ModelType.encoder_or_decoder
        layers: StageLayers = plan.stages()[stage]
        self.layers_here = layers
        self.pre_process = stage == 0  # megatron's name for "the stage that feeds the pipeline"
        # (``stage`` is the virtual stage index: pipeline rank + chunk x pipeline_parallel)
        self.post_process = layers.holds_head
        # finalize_model_grads all-reduces shared_embedding_or_output_weight() over the
        # embedding group only when this is set: true whenever the embedding has copies on
        # several stages (tied head, or an E2D2 decoder that starts on a later stage).
        self.share_embeddings_and_output_weights = len(plan.embedding_stages()) > 1
        self.input_tensor: torch.Tensor | None = None
        self.context = ContextSplit.current()  # None without context parallelism

        if layers.holds_embedding or (layers.holds_head and cfg.tie_word_embeddings):
            self.embed = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size,
                                                init_method=None, config=config)
        self.layers = nn.ModuleList(ParallelTransformerLayer(cfg, config) for _ in layers.encoder)
        plan = cfg.plan
        self.ends_encoder = plan.has_decoder and len(layers.encoder) > 0 and (
            layers.encoder.stop == cfg.num_layers
        )
        if plan.own_decoder_kv and self.ends_encoder:
            self.encoder_norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        if plan.has_decoder and not cfg.tie_decoder_to_encoder:
            self.decoder_layers = nn.ModuleList(
                ParallelTransformerLayer(cfg, config) for _ in layers.decoder
            )
        if layers.holds_head:
            self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
            self.lm_head = _Column(cfg.hidden_size, cfg.vocab_size, config,
                                   skip_weight_param_allocation=cfg.tie_word_embeddings)

    # -- hooks megatron's schedules and finalize_model_grads call -------------------------
    def set_input_tensor(self, input_tensor) -> None:
        self.input_tensor = input_tensor[0] if isinstance(input_tensor, list) else input_tensor

    def shared_embedding_or_output_weight(self) -> torch.Tensor | None:
        """The word embedding copy this stage holds; its gradient is all-reduced over the
        embedding group (``PipelinePlan.embedding_stages``)."""
        return self.embed.weight if hasattr(self, "embed") else None

    # -- forward ---------------------------------------------------------------------------
    def stream_length(self) -> int:
        """Length ``T`` of the inter-stage tensor (megatron's ``seq_length``)."""
        return self.cfg.num_streams * self.cfg.seq_length

    def _mask(self, spec: masks.AttentionMask, batch: dict[str, torch.Tensor]):
        x0 = batch["x0"]
        # the annealing ratio of the step (`megatron_ext.objective.noised_batch`), one per row
        anneal = float(batch["anneal_ratio"][0]) if "anneal_ratio" in batch else 1.0
        spec = masks.for_model(spec, bidirectional_prompt=self.cfg.prompt_is_bidirectional,
                               shift=self.cfg.shift, anneal=anneal)
        args = (spec, x0.shape[1], self.cfg.diffusion_block_size, x0.device, x0.shape[0],
                batch.get("context_mask"), batch.get("attention_mask"))
        return self.context.mask(*args) if self.context else build_mask(*args)

    def _local(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[b, L]`` -> this context-parallel rank's ``[b, L / C]`` (itself without CP)."""
        return self.context.local(tokens) if self.context else tokens

    def _rope(self, positions: torch.Tensor):
        return rotary(positions, self.cfg.kv_channels, self.cfg.rope_theta)

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[b, s]`` tokens -> ``[b, s, hidden]``, or this rank's ``[b, s / TP, hidden]``
        slice of positions with sequence parallelism."""
        h = self.embed(tokens)
        if not self.config.sequence_parallel:
            return h
        return scatter_to_sequence_parallel_region(h.transpose(0, 1)).transpose(0, 1)

    def _noisy(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The noisy stream's tokens ``[b, L]``: ``xt``, or its shifted form (`e2d2.shift`);
        None for AR, which has none."""
        if self.cfg.plan.autoregressive:
            return None
        if not self.cfg.shift:
            return self._local(batch["xt"])
        return self._local(shift.noisy_input(self.cfg.plan, batch["x0"], batch["xt"],
                                             self.cfg.diffusion_block_size))

    def _incoming(self) -> torch.Tensor:
        """Previous stage's tensor ``[T, b, hidden]`` as ``[b, T, hidden]``."""
        return self.input_tensor.transpose(0, 1)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with fp8_context(self.config):  # a no-op unless TransformerConfig.fp8 is set
            out = self._forward(batch)
        # the reference's alignment with the targets, on the logits of the last stage (with
        # context parallelism on the gathered NLL: megatron_ext.objective._sequence_nll)
        aligned = self.cfg.shift and self.post_process and not self.context
        return shift.align_logits(out) if aligned else out

    def _forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        plan, x0 = self.cfg.plan, batch["x0"]
        L = x0.shape[1]
        # this rank's positions of each stream (all of them without context parallelism)
        pos = self.context.positions(L, x0.device) if self.context else torch.arange(L, device=x0.device)
        if plan.has_decoder:
            return self._forward_e2d2(batch, self._rope(pos))
        # a single stack: its streams concatenated, its layers spread over the stages
        h = (self._embed(plan.main_tokens(self._local(x0), self._noisy(batch))) if self.pre_process
             else self._incoming())
        h, _ = run_layers(self.layers, h, self._rope(plan.main_positions(pos)),
                          self._mask(plan.main_mask, batch))
        return self._out(h, predicted=plan.predicted(len(pos)))

    def _forward_e2d2(self, batch: dict[str, torch.Tensor], rope) -> torch.Tensor:
        cfg, plan, x0 = self.cfg, self.cfg.plan, self._local(batch["x0"])
        here = self.layers_here
        if self.pre_process:
            h_enc = self._embed(x0)
            h_dec = self._embed(self._noisy(batch)) if here.embeds_noisy else torch.zeros_like(h_enc)
        else:
            incoming = self._incoming()
            h_enc, h_dec = incoming.split(incoming.shape[1] // 2, dim=1)
        enc_kv = []
        if len(self.layers):  # decoder-only stages build no encoder mask
            h_enc, enc_kv = run_layers(self.layers, h_enc, rope, self._mask(plan.main_mask, batch),
                                       last_kv_only=plan.top_layer_kv_only and self.ends_encoder)
        if plan.own_decoder_kv and self.ends_encoder:
            h_enc = self.encoder_norm(h_enc)
        decoder = self._decoder_layers()
        if decoder:
            if here.embeds_noisy and not self.pre_process:
                h_dec = self._embed(self._noisy(batch))
            if plan.own_decoder_kv:
                prefixes = [layer.kv(h_enc, rope) for layer in decoder]
            else:  # shared-KV: PipelinePlan keeps the whole model on one stage
                prefixes = [enc_kv[cfg.matched_encoder_layer(k)] for k in self.layers_here.decoder]
            h_dec, _ = run_layers(decoder, h_dec, rope, self._mask(plan.decoder_mask, batch),
                                 prefixes)
        if self.post_process:
            return self._logits(h_dec)
        return torch.cat((h_enc, h_dec), 1).transpose(0, 1).contiguous()

    def _decoder_layers(self) -> list[nn.Module]:
        if self.cfg.tie_decoder_to_encoder:
            return [self.layers[self.cfg.matched_encoder_layer(k)] for k in self.layers_here.decoder]
        return list(self.decoder_layers) if self.cfg.plan.has_decoder else []

    def _out(self, h: torch.Tensor, predicted: slice = slice(None)) -> torch.Tensor:
        if not self.post_process:
            return h.transpose(0, 1).contiguous()
        if self.config.sequence_parallel:  # positions are gathered only inside the LM head
            # Sequence-first logits seen batch-first: a slice of positions stays contiguous
            # sequence-first, as the loss wants it (megatron_ext.objective).
            return self._logits(h)[:, predicted]
        return self._logits(h[:, predicted])

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and (tied) LM head: ``[b, L, hidden] -> [b, L, vocab / TP]``."""
        weight = self.embed.weight if self.cfg.tie_word_embeddings else None
        return self.lm_head(self.norm(h), weight=weight)


def build_chunks(model: ModelConfig, parallel: ParallelConfig) -> list[ParallelDiffusionLM]:
    """This rank's model chunks, in schedule order (after ``megatron_layout`` /
    ``initialize_model_parallel``): one stage, or ``virtual_pipeline`` interleaved stages.
    Weights are uninitialised: draw them with ``megatron_ext.mapping.initialize_at_seed`` or
    load them with ``load_reference_state`` / ``megatron_ext.checkpoint.load``.

    Built on CPU (``use_cpu_initialization``) in the parameter dtype (fp32, or bf16 with
    ``parallel.bf16``: norms included, as megatron's ``Float16Module`` would cast them);
    when CUDA is available the chunks are then moved to ``torch.cuda.current_device()``.
    The CUDA move is not verified on a GPU (see docs/parallel.md)."""
    plan = PipelinePlan(model, parallel)
    config = transformer_config(model, parallel)
    rank, pp = parallel_state.get_pipeline_model_parallel_rank(), parallel.pipeline_parallel
    # Module.to keeps the Parameter objects (and so the attributes _tagged set).
    chunks = [_tagged(ParallelDiffusionLM(model, plan, chunk * pp + rank, config)).to(config.params_dtype)
              for chunk in range(parallel.virtual_pipeline or 1)]
    if torch.cuda.is_available():
        # Module.to keeps the Parameter objects (and so the attributes _tagged set).
        chunks = [chunk.cuda(torch.cuda.current_device()) for chunk in chunks]
    return chunks


def _tagged(stage: ParallelDiffusionLM) -> ParallelDiffusionLM:
    """Set the parameter attributes that megatron's own modules would have set: DDP, the
    optimizer, gradient clipping and ``finalize_model_grads`` read them.

    megatron-core 0.16.1 sets, and here:

    * ``tensor_model_parallel``, ``partition_dim``, ``partition_stride``: column/row-parallel
      linears and ``VocabParallelEmbedding``, but only inside their own initialisation
      (``_initialize_affine_weight_*``), which ``perform_initialization=False`` skips; set
      here on every split weight. Untagged, gradient clipping counts a split weight as a TP
      duplicate (the norm of TP rank 0's shard only) and the optimizer treats it as
      replicated. Transformer Engine's linears tag their own (megatron's setter asserts the
      attributes are unset), so weights already tagged are left alone.
    * ``sequence_parallel``: megatron's ``FusedLayerNorm`` (and TE's linears in duplicated
      mode) on their weights, from ``config.sequence_parallel``; set here on every
      replicated weight (the norms), which with sequence parallelism see only this TP
      rank's positions, so ``finalize_model_grads`` sums their gradients over TP.
    * ``allreduce``: the linears set it themselves (True); the embedding and norms leave it
      unset, which reads as True. Only MoE experts differ: nothing to do.
    * ``is_embedding_or_output_parameter``, ``shared``, ``shared_embedding``,
      ``zero_out_wgrad``: ``LanguageModule.setup_embeddings_and_output_layer``, which this
      stage (not a ``LanguageModule``) reproduces in ``_tag_embedding``.
    * ``is_qkv``: no megatron module sets it; its Muon optimizer setup tags weights named
      ``linear_qkv.weight``, as the fused q|k|v weight here is (megatron's layout).
    * Not applicable: ``expert_tp`` (MoE), ``average_gradients_across_tp_domain``
      (HuggingFace wrappers), ``pipeline_parallel`` (conditional embedders).
    """
    for m in param_maps(stage):
        if hasattr(m.param, "tensor_model_parallel"):
            continue
        if m.tp_axis is not None:
            set_tensor_model_parallel_attributes(m.param, is_parallel=True, dim=m.tp_axis, stride=1)
        else:
            m.param.sequence_parallel = stage.config.sequence_parallel
    _tag_embedding(stage)
    return stage


def _tag_embedding(stage: ParallelDiffusionLM) -> None:
    """megatron's ``LanguageModule.setup_embeddings_and_output_layer`` tagging, generalised
    from its two copies (first and last stage) to ``PipelinePlan.embedding_stages()`` (E2D2
    adds the first decoder stage, tied or untied)."""
    here, tied = stage.layers_here, stage.cfg.tie_word_embeddings
    if here.holds_head and not tied:
        stage.lm_head.weight.is_embedding_or_output_parameter = True  # for decoupled_lr
    if not hasattr(stage, "embed"):
        return
    weight = stage.embed.weight
    weight.is_embedding_or_output_parameter = True
    if stage.share_embeddings_and_output_weights:  # copies on several stages
        # Each copy in its own DDP bucket: with the distributed optimizer every DP rank then
        # owns the same slice of the embedding on every stage, so the embedding-group
        # all-reduce that follows the DP reduce-scatter adds fully reduced slices only.
        # Without it the copies sit at different offsets of their stages' buffers, the DP
        # shards cut them differently, and fully reduced slices get added to partial ones.
        weight.shared_embedding = True
        if stage.stage != stage.plan.embedding_stages()[0]:
            # Counted once in the gradient norm, as megatron marks the last stage's copy.
            weight.shared = True
    if here.holds_embedding and here.holds_head and tied:
        # Token lookup and tied LM head on one stage (megatron: PP=1; here also an E2D2 last
        # stage that embeds xt). With gradient_accumulation_fusion (off in
        # transformer_config) the head's wgrad goes straight to main_grad and DDP would drop
        # the lookup's .grad; this flag keeps both. No effect without the fusion.
        weight.zero_out_wgrad = True
