"""Hugging Face wrapper of an exported E2D2-family model (shipped by ``e2d2 export-hf``).

The network is ``DiffusionLM`` from ``e2d2_model.py`` and generation is ``sample`` from
``e2d2_sampling.py``: both are the project's reference code, copied at export with only
their imports made relative, so this directory needs torch and transformers only.

* ``model(input_ids=xt, clean_input_ids=x0)`` -> ``.logits [batch, L, vocab]``, the
  training model's logits for the noisy tokens ``xt`` given the clean ones ``x0`` (AR: the
  next-token logits of ``input_ids``; MDLM reads ``input_ids`` only).
* ``model.generate(input_ids, max_new_tokens=N, strategy=..., steps=..., temperature=...,
  eos_token_id=...)`` -> ``[batch, P + N]`` ids: the block-diffusion sampler with KV cache.
  Unset arguments come from ``generation_config.json`` (the run's sampler settings).
"""

import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput

from .configuration_e2d2 import E2D2Config
from .e2d2_model import DiffusionLM
from .e2d2_sampling import SamplerConfig, sample

# SamplerConfig fields that generate() takes as arguments or from the generation config.
SAMPLER_FIELDS = ("max_new_tokens", "strategy", "steps", "schedule", "temperature", "threshold",
                  "eos_token_id")


class E2D2PreTrainedModel(PreTrainedModel):
    config_class = E2D2Config
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["TransformerLayer"]


class E2D2ForMaskedLM(E2D2PreTrainedModel, GenerationMixin):
    """The denoiser. Also what ``AutoModel`` loads: the reference model has no headless
    variant, its forward pass is the denoiser itself."""

    def __init__(self, config: E2D2Config):
        super().__init__(config)
        self.model = DiffusionLM(config.to_model_config())
        self.post_init()

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embed

    def forward(
        self,
        input_ids: torch.LongTensor,
        clean_input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        return_dict: bool | None = None,
    ) -> MaskedLMOutput | tuple[torch.Tensor]:
        """``input_ids``: the noisy tokens ``xt [batch, L]``; ``clean_input_ids``: the clean
        ``x0`` (default: ``input_ids``, as the uncached sampler does). ``attention_mask``
        (1 = real token) and ``context_mask`` (1 = prompt): ``[batch, L]``."""
        x0 = input_ids if clean_input_ids is None else clean_input_ids
        logits = self.model(x0, input_ids, attention_mask, context_mask)
        if return_dict is False:
            return (logits,)
        return MaskedLMOutput(logits=logits)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor,
        max_new_tokens: int | None = None,
        strategy: str | None = None,
        steps: int | None = None,
        temperature: float | None = None,
        eos_token_id: int | list[int] | None = None,
        threshold: float | None = None,
        schedule: str | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.LongTensor:
        """Prompt ``input_ids [batch, P]`` -> ``[batch, P + max_new_tokens]``: prompt, then the
        completion; after a row's first EOS every position holds EOS.

        ``strategy``: ancestral, first_hitting, topk, topk_margin or threshold;
        ``temperature=0`` is greedy. All rows share the prompt length: the block cache has
        no padding, so a padded ``attention_mask`` is refused.
        """
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("generate takes prompts of one length (no padding): the block "
                             "cache has no notion of padding; call it once per prompt length")
        given = dict(max_new_tokens=max_new_tokens, strategy=strategy, steps=steps,
                     temperature=temperature, eos_token_id=eos_token_id, threshold=threshold,
                     schedule=schedule)
        defaults = self.generation_config
        values = {name: given[name] if given[name] is not None else getattr(defaults, name, None)
                  for name in SAMPLER_FIELDS}
        eos = values["eos_token_id"]
        if isinstance(eos, (list, tuple)):
            if len(eos) != 1:
                raise ValueError(f"eos_token_id={eos}: the sampler stops on one EOS id; pass one")
            values["eos_token_id"] = eos[0]
        cfg = SamplerConfig(**{k: v for k, v in values.items() if v is not None}, use_cache=use_cache)
        return sample(self.model, input_ids.to(self.device), cfg, generator).tokens
