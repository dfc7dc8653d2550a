"""Configuration dataclasses. Every invalid combination raises one `ConfigError` at construction.

| dataclass | what |
| --- | --- |
| `ModelConfig` | architecture and variant |
| `DiffusionConfig` | noise schedule and loss weighting |
| `TrainConfig` | optimizer, schedule, batch sizes, evaluation |
| `SamplerConfig` | how to sample (`e2d2.sampling`) |

This module imports no torch (nor does anything it imports): the command line validates a
run config and answers ``--help`` without waiting seconds for it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from e2d2.errors import ConfigError, require
from e2d2.noise import get_schedule
from e2d2.variants import PLANS, VariantPlan

Variant = Literal["e2d2", "e2d2_shared_kv", "bd3lm", "mdlm", "ar"]
VARIANTS: tuple[str, ...] = tuple(PLANS)
SCHEDULES: tuple[str, ...] = ("linear", "cosine", "exp", "log", "clipped_linear")
LOSS_WEIGHTINGS: tuple[str, ...] = ("none", "elbo")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of one model variant (Qwen3-style layers).

    ``num_layers`` is the main stack: the encoder for E2D2, the only stack for the
    baselines. ``num_decoder_layers`` is E2D2's decoder depth and must be 0 otherwise.
    """

    variant: Variant = "e2d2"
    vocab_size: int = 260
    mask_token_id: int = 259
    hidden_size: int = 128
    ffn_hidden_size: int = 384
    num_attention_heads: int = 4
    num_query_groups: int = 2
    head_dim: int | None = None
    num_layers: int = 4
    num_decoder_layers: int = 1
    seq_length: int = 128
    block_size: int = 4
    qk_layernorm: bool = True
    tie_word_embeddings: bool = True
    # Shared-KV only: decoder layer k *is* encoder layer num_layers - num_decoder_layers + k.
    tie_decoder_to_encoder: bool = False
    # Whether prompt (context) tokens read each other bidirectionally in the clean stream
    # (`e2d2.masks`). None = the variant's convention: E2D2 yes (seq2seq prompts), BD3-LM no
    # (the authors' code ignores the context mask there: clean part block-causal, spec 3.3).
    bidirectional_prompt: bool | None = None
    # Adapting an AR checkpoint (spec 7, `e2d2.shift`): the noisy stream's slot s predicts
    # token s + 1, as the AR model did. Position 0 is then never a target.
    shift: bool = False
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02

    def __post_init__(self) -> None:
        require(self.variant in PLANS, f"unknown variant {self.variant!r}; choose one of {tuple(PLANS)}")
        for name in ("vocab_size", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                     "num_query_groups", "num_layers", "seq_length", "block_size"):
            require(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        require(0 <= self.mask_token_id < self.vocab_size,
                 f"mask_token_id={self.mask_token_id} must be a vocabulary id in [0, {self.vocab_size})")
        require(self.num_attention_heads % self.num_query_groups == 0,
                 f"num_attention_heads={self.num_attention_heads} is not divisible by "
                 f"num_query_groups={self.num_query_groups} (KV heads); pick a divisor")
        require(self.head_dim is not None or self.hidden_size % self.num_attention_heads == 0,
                 f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                 f"{self.num_attention_heads}; set head_dim explicitly")
        require(self.kv_channels % 2 == 0, f"head_dim={self.kv_channels} must be even for RoPE")
        require(self.seq_length % self.block_size == 0,
                 f"seq_length={self.seq_length} is not a multiple of block_size={self.block_size}")
        if self.is_e2d2:
            require(self.num_decoder_layers > 0, f"{self.variant} needs num_decoder_layers >= 1")
        else:
            require(self.num_decoder_layers == 0,
                     f"variant {self.variant!r} has a single stack: set num_decoder_layers=0 "
                     f"(got {self.num_decoder_layers}) and put all layers in num_layers")
        if self.tie_decoder_to_encoder:
            require(self.plan.decoder_keys == "encoder_kv",
                     "tie_decoder_to_encoder needs variant='e2d2_shared_kv'")
        if self.bidirectional_prompt is not None:
            require(self.num_streams == 2,
                     f"bidirectional_prompt applies to E2D2 and BD3-LM only (their clean stream); "
                     f"variant {self.variant!r} must leave it unset")
        if self.shift:
            require(self.is_diffusion,
                     "shift makes a diffusion model predict the next token like an AR model; the "
                     "'ar' variant already does: set shift=false (or pick a diffusion variant)")
        if self.plan.decoder_keys == "encoder_kv":
            require(self.num_decoder_layers <= self.num_layers,
                     f"shared-KV decoder layers attend to matched encoder layers: num_decoder_layers="
                     f"{self.num_decoder_layers} must be <= num_layers={self.num_layers}")

    @property
    def kv_channels(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    @property
    def plan(self) -> VariantPlan:
        """The variant's stream plan (`e2d2.variants`)."""
        return PLANS[self.variant]

    @property
    def is_e2d2(self) -> bool:
        """Whether an encoder and a decoder (E2D2 last-hidden or shared-KV)."""
        return self.plan.has_decoder

    @property
    def is_diffusion(self) -> bool:
        return not self.plan.autoregressive

    @property
    def prompt_is_bidirectional(self) -> bool:
        """``bidirectional_prompt`` resolved: E2D2 True, BD3-LM False unless set, else False."""
        if self.bidirectional_prompt is not None:
            return self.bidirectional_prompt
        return self.is_e2d2

    @property
    def num_streams(self) -> int:
        """Length-``L`` token streams the model runs: clean and noisy (E2D2, BD3-LM) or one."""
        return self.plan.num_streams

    @property
    def diffusion_block_size(self) -> int:
        """Block size of the noising process: MDLM noises the whole sequence as one block."""
        return self.seq_length if self.plan.decoding == "whole_sequence" else self.block_size

    def matched_encoder_layer(self, k: int) -> int:
        """Shared-KV: the encoder layer whose K/V decoder layer ``k`` reads (the top layers)."""
        return self.num_layers - self.num_decoder_layers + k

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class DiffusionConfig:
    """Noising process and loss (spec sections 2 and 4).

    ``schedule`` shapes training only: evaluation integrates the NELBO over ``t in [0, 1]``
    with the true ELBO weight of the unclipped schedule (`e2d2.noise.evaluation_schedule`).
    Two conventions of the authors' code, off by default:

    * ``keep_clean_bos``: position 0 (BOS) is never masked and is no target, so the NELBO
      averages over the same ``L - 1`` tokens as the AR baseline's next-token NLL;
    * ``remask_prompt_blocks=False``: the training re-mask rule (spec 2.4) skips a block that
      holds a prompt (context) token, instead of re-masking every block left with eligible
      tokens but none masked.

    ``anneal_steps`` (spec 7, adapting an AR checkpoint): over the first ``anneal_steps``
    training steps the attention mask anneals from causal to the variant's mask
    (`e2d2.masks.with_anneal`, ratio ``min(1, step / anneal_steps)``); 0 = off. Evaluation
    and sampling always use the variant's mask.
    """

    schedule: str = "linear"
    schedule_kwargs: dict[str, float] = field(default_factory=dict)
    loss_weighting: str = "none"
    antithetic: bool = True
    keep_clean_bos: bool = False
    remask_prompt_blocks: bool = True
    anneal_steps: int = 0

    def __post_init__(self) -> None:
        require(self.anneal_steps >= 0, f"anneal_steps must be >= 0 (0 disables), got {self.anneal_steps}")
        require(self.schedule in SCHEDULES, f"unknown schedule {self.schedule!r}; choose one of {SCHEDULES}")
        require(self.loss_weighting in LOSS_WEIGHTINGS,
                 f"unknown loss_weighting {self.loss_weighting!r}; choose one of {LOSS_WEIGHTINGS}")
        get_schedule(self.schedule, **self.schedule_kwargs)  # validates the kwargs now


LR_DECAY_STYLES: tuple[str, ...] = ("cosine", "linear", "constant")
# Training precision of the megatron engine (megatron_ext.layout.ParallelConfig.precision);
# this module's single-process trainer always runs fp32.
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp8")


@dataclass(frozen=True)
class TrainConfig:
    """Optimizer and loop settings (defaults follow the paper: Adam(0.9, 0.98), clip 1.0).

    ``batch_size`` is the global batch in sequences: ``micro_batch_size x gradient
    accumulation x data-parallel size`` in the megatron engine (``micro_batch_size`` unset
    means no accumulation). The learning rate warms up linearly for ``warmup_steps``, then
    follows ``lr_decay`` down to ``min_lr_ratio x lr`` at ``steps``. ``ema_decay`` > 0 keeps
    an exponential moving average of the weights (the paper uses 0.9999), used for
    evaluation and export. ``max_consecutive_skips`` non-finite steps in a row abort a run.
    ``precision`` (``PRECISIONS``) is the engine's: fp32, bf16 mixed precision (fp32 main
    parameters and gradients), or fp8 (bf16 plus FP8 linears, needs Transformer Engine).
    """

    steps: int = 600
    batch_size: int = 32
    micro_batch_size: int | None = None
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    lr_decay: str = "cosine"
    weight_decay: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.98)
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    ema_decay: float = 0.0
    eval_every: int = 100
    eval_batches: int = 4
    eval_draws: int = 2
    max_consecutive_skips: int = 5
    precision: str = "fp32"

    def __post_init__(self) -> None:
        require(self.steps > 0 and self.batch_size > 0, "steps and batch_size must be positive")
        require(self.micro_batch_size is None or 0 < self.micro_batch_size <= self.batch_size,
                f"micro_batch_size={self.micro_batch_size} must be in 1..batch_size={self.batch_size}")
        require(self.lr > 0, f"lr must be positive, got {self.lr}")
        require(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        require(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        require(self.lr_decay in LR_DECAY_STYLES,
                f"unknown lr_decay {self.lr_decay!r}; choose one of {LR_DECAY_STYLES}")
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
                f"betas must be two numbers in [0, 1), got {self.betas}")
        require(self.adam_eps > 0, f"adam_eps must be positive, got {self.adam_eps}")
        require(self.grad_clip >= 0, f"grad_clip must be >= 0 (0 disables), got {self.grad_clip}")
        require(0 <= self.ema_decay < 1, f"ema_decay must be in [0, 1) (0 disables), got {self.ema_decay}")
        require(self.eval_every > 0, "eval_every must be positive")
        require(self.eval_batches > 0 and self.eval_draws > 0, "eval_batches and eval_draws must be positive")
        require(self.max_consecutive_skips > 0, "max_consecutive_skips must be positive")
        require(self.precision in PRECISIONS,
                f"unknown precision {self.precision!r}; choose one of {PRECISIONS}")


STRATEGIES: tuple[str, ...] = ("ancestral", "first_hitting", "topk", "topk_margin", "threshold")


@dataclass(frozen=True)
class SamplerConfig:
    """How to sample.

    * ``strategy``: ``ancestral`` (posterior of the masked process), ``first_hitting`` (one
      token per step; ``steps`` does not apply), ``topk`` / ``topk_margin`` (reveal the most
      confident tokens, as many as the schedule says), ``threshold`` (reveal every token whose
      probability exceeds ``threshold``, at least one per step). AR models ignore it.
    * ``steps``: denoising steps per block; the last one reveals whatever is still masked.
    * ``schedule``: noise schedule that places the step times (`e2d2.noise`) on the grid
      ``1 = t_0 > ... > t_steps = min_t``. ``min_t`` (in ``[0, 1)``) is the last step's time.
    * ``temperature``: 0 means greedy (argmax values); otherwise logits are divided by it.
    * ``top_p``: nucleus filtering: values are drawn from the smallest set of tokens whose
      probability reaches ``top_p`` (1 = off); confidences still read the model's unfiltered
      probabilities (filtered, every kept-alone token would have confidence 1).
    * ``eos_token_id``: a row stops after the block in which it generates this token;
      positions after its first EOS are filled with EOS.
    * ``stop_strings``: a row also stops once its decoded completion contains one of them
      (``sample`` then needs ``decode``); it ends with the token that completes the string.
    * ``use_cache``: False recomputes the full forward over the whole prefix at every step
      (the reference the KV cache is tested against).
    * ``block_size``: block size at inference (E2D2 and BD3-LM; None = the trained one).
    * ``sliding_window``: generate past ``seq_length`` by dropping the oldest cached blocks
      (needs ``use_cache``; E2D2 and BD3-LM).
    """

    strategy: str = "ancestral"
    steps: int = 16
    schedule: str = "linear"
    temperature: float = 1.0
    threshold: float = 0.9
    max_new_tokens: int = 64
    eos_token_id: int | None = None
    use_cache: bool = True
    top_p: float = 1.0
    min_t: float = 0.0
    stop_strings: tuple[str, ...] = ()
    block_size: int | None = None
    sliding_window: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop_strings, str) or not all(isinstance(s, str) and s for s in self.stop_strings):
            raise ConfigError(f"stop_strings must be a list of non-empty strings, got {self.stop_strings!r}")
        object.__setattr__(self, "stop_strings", tuple(self.stop_strings))  # YAML gives a list
        checks = (
            (self.strategy in STRATEGIES,
             f"unknown strategy {self.strategy!r}; choose one of {STRATEGIES}"),
            (self.schedule in SCHEDULES,
             f"unknown schedule {self.schedule!r}; choose one of {SCHEDULES}"),
            (self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.temperature >= 0,
             f"temperature must be >= 0 (0 = greedy), got {self.temperature}"),
            (0.0 <= self.threshold < 1.0, f"threshold must be in [0, 1), got {self.threshold}"),
            (self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}"),
            (self.eos_token_id is None or self.eos_token_id >= 0,
             f"eos_token_id must be a token id >= 0, got {self.eos_token_id}"),
            (0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1] (1 = off), got {self.top_p}"),
            (0.0 <= self.min_t < 1.0, f"min_t must be in [0, 1), got {self.min_t}"),
            (self.block_size is None or self.block_size >= 1,
             f"block_size must be >= 1 (or unset for the trained one), got {self.block_size}"),
            (not (self.sliding_window and not self.use_cache),
             "sliding_window drops cached blocks: it needs use_cache=True"),
        )
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)
