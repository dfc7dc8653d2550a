"""Invalid configurations fail at construction with one clear message."""

from __future__ import annotations

import pytest

from e2d2.config import DiffusionConfig, ModelConfig
from e2d2.errors import ConfigError


@pytest.mark.parametrize("kwargs,match", [
    (dict(seq_length=130, block_size=4), "not a multiple of block_size"),
    (dict(num_attention_heads=6, num_query_groups=4), "not divisible by num_query_groups"),
    (dict(variant="e2d2_shared_kv", num_layers=2, num_decoder_layers=3, tie_decoder_to_encoder=True),
     "must be <= num_layers"),
    (dict(variant="gpt"), "unknown variant"),
    (dict(variant="bd3lm", num_decoder_layers=2), "single stack"),
    (dict(variant="e2d2", tie_decoder_to_encoder=True), "needs variant='e2d2_shared_kv'"),
    (dict(mask_token_id=999), "mask_token_id"),
    (dict(hidden_size=130, num_attention_heads=4), "set head_dim"),
    (dict(variant="mdlm", num_decoder_layers=0, bidirectional_prompt=True), "E2D2 and BD3-LM only"),
])
def test_invalid_model_config(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig(**kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(schedule="sigmoid"), "unknown schedule"),
    (dict(loss_weighting="snr"), "unknown loss_weighting"),
    (dict(schedule="clipped_linear", schedule_kwargs={"beta_min": 0.5, "beta_max": 0.2}), "beta_min"),
])
def test_invalid_diffusion_config(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        DiffusionConfig(**kwargs)


def test_valid_configs_construct():
    for variant in ("e2d2", "e2d2_shared_kv"):
        assert ModelConfig(variant=variant).is_e2d2
    for variant in ("bd3lm", "mdlm", "ar"):
        ModelConfig(variant=variant, num_decoder_layers=0)
    assert ModelConfig(variant="mdlm", num_decoder_layers=0, seq_length=64).diffusion_block_size == 64


def test_prompt_reading_follows_the_variant_unless_set():
    assert ModelConfig(variant="e2d2").prompt_is_bidirectional
    assert not ModelConfig(variant="bd3lm", num_decoder_layers=0).prompt_is_bidirectional  # the authors'
    assert ModelConfig(variant="bd3lm", num_decoder_layers=0, bidirectional_prompt=True).prompt_is_bidirectional
    assert not ModelConfig(variant="e2d2", bidirectional_prompt=False).prompt_is_bidirectional
