"""What a sampler run is asked to do: `SamplerConfig` and the strategies it names."""

from __future__ import annotations

from dataclasses import dataclass

from e2d2.config import SCHEDULES
from e2d2.errors import ConfigError

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
