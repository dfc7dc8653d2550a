"""Configuration of an exported E2D2-family model (shipped by ``e2d2 export-hf``).

Its fields are exactly those of the reference ``ModelConfig`` (``e2d2_config.py``, generated
from the project's code); the export writes the field block below from that dataclass, so
``to_model_config`` rebuilds the configuration the weights were trained with.
"""

import dataclasses

from transformers import PretrainedConfig

from .e2d2_config import ModelConfig


class E2D2Config(PretrainedConfig):
    model_type = "e2d2"
    # The usual Hugging Face names of the reference model's fields, for generic tooling.
    attribute_map = {
        "num_hidden_layers": "num_layers",
        "intermediate_size": "ffn_hidden_size",
        "num_key_value_heads": "num_query_groups",
        "max_position_embeddings": "seq_length",
        "rms_norm_eps": "norm_eps",
    }
    # ModelConfig fields (generated):

    def to_model_config(self) -> ModelConfig:
        """The reference configuration; raises ``ConfigError`` naming an invalid field."""
        return ModelConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ModelConfig)})
