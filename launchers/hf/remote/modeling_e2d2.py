"""Hugging Face wrapper of an exported E2D2-family model (shipped by ``e2d2 export-hf``).

The network is ``DiffusionLM`` from ``e2d2_model.py`` and generation is ``sample`` from
``e2d2_sampling.py``: both are the project's reference code, copied at export with only
their imports made relative, so this directory needs torch and transformers only.

* ``model(input_ids=xt, clean_input_ids=x0)`` -> ``.logits [batch, L, vocab]``, the
  training model's logits for the noisy tokens ``xt`` given the clean ones ``x0`` (AR: the
  next-token logits of ``input_ids``; MDLM reads ``input_ids`` only).
* ``model.generate(input_ids, attention_mask=None, max_new_tokens=N, strategy=..., ...)``
  -> ``[batch, P + N]`` ids: the block-diffusion sampler with KV cache. It takes every
  ``SamplerConfig`` field as a keyword; unset ones come from ``generation_config.json`` (the
  run's sampler settings, every field).
"""

import dataclasses

import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput

from .configuration_e2d2 import E2D2Config
from .e2d2_model import DiffusionLM
from .e2d2_sampling import SamplerConfig, sample

# The sampler settings generate() takes as keywords and reads from the generation config.
SAMPLER_FIELDS = tuple(f.name for f in dataclasses.fields(SamplerConfig))

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
        attention_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        seeds: list[int] | None = None,
        tokenizer=None,
        **sampler,
    ) -> torch.LongTensor:
        """Prompts ``input_ids [batch, P]`` -> ``[batch, P + max_new_tokens]``: ``input_ids``
        as given, then each row's completion; after a row's first EOS every position holds EOS.

        ``attention_mask [batch, P]`` (1 = prompt token): rows may be padded on the left or
        the right and have any lengths; each row's completion is that of its prompt sampled
        alone. ``sampler``: any ``SamplerConfig`` field (``strategy``, ``steps``,
        ``temperature`` (0 = greedy), ``top_p``, ``block_size``, ``stop_strings``, ...); an
        unset one comes from the generation config. ``seeds``: one per row (row ``r`` draws
        from its own stream, as ``e2d2 sample --seed`` gives prompt ``i`` seed + i); by
        default drawn from ``generator``. ``tokenizer``: decodes for ``stop_strings``.
        """
        unknown = sorted(set(sampler) - set(SAMPLER_FIELDS))
        if unknown:
            raise TypeError(f"generate() got unknown arguments {unknown}; the sampler's settings "
                            f"are {list(SAMPLER_FIELDS)}")
        values = {}
        for name in SAMPLER_FIELDS:
            value = sampler.get(name)
            if value is None:
                value = getattr(self.generation_config, name, None)
            if value is not None:
                values[name] = value
        eos = values.get("eos_token_id")
        if isinstance(eos, (list, tuple)):
            if len(eos) != 1:
                raise ValueError(f"eos_token_id={eos}: the sampler stops on one EOS id; pass one")
            values["eos_token_id"] = eos[0]
        cfg = SamplerConfig(**values)
        if cfg.stop_strings and tokenizer is None:
            raise ValueError(f"stop_strings {list(cfg.stop_strings)} need the model's tokenizer: "
                             "pass tokenizer=AutoTokenizer.from_pretrained(...) to generate")
        decode = None if tokenizer is None else tokenizer.decode
        ids = input_ids.to(self.device)
        prompt, lengths = _left_aligned(ids, attention_mask)
        out = sample(self.model, prompt, cfg, generator, seeds=seeds, decode=decode, prompt_lengths=lengths)
        completion = out.tokens.gather(1, lengths[:, None] + torch.arange(cfg.max_new_tokens, device=ids.device))
        return torch.cat((ids, completion), 1)


def _left_aligned(ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``ids [batch, P]`` with each row's prompt moved to its start, and the prompt lengths
    ``[batch]``. A row's prompt is its one run of ``attention_mask == 1`` (left or right
    padding)."""
    batch, width = ids.shape
    if attention_mask is None:
        return ids, torch.full((batch,), width, dtype=torch.long, device=ids.device)
    real = attention_mask.to(ids.device).bool()
    if real.shape != ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(real.shape)}, input_ids {tuple(ids.shape)}")
    lengths = real.sum(1)
    starts = real.long().argmax(1)  # the first prompt token (0 for an empty row)
    runs = (real[:, 1:] & ~real[:, :-1]).sum(1) + real[:, 0].long()
    if bool((runs > 1).any()):
        row = int((runs > 1).nonzero()[0])
        raise ValueError(f"attention_mask row {row} has padding inside the prompt: pad on the "
                         "left or the right only")
    col = (starts[:, None] + torch.arange(width, device=ids.device)).clamp(max=width - 1)
    return ids.gather(1, col), lengths
