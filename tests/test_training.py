"""A tiny E2D2 trained on CPU learns: its validation NELBO falls clearly below the start."""

from __future__ import annotations

import torch

from data_tools.corpus import iter_documents
from data_tools.tokenizer import load_tokenizer
from e2d2.config import DiffusionConfig, ModelConfig, TrainConfig
from e2d2.diffusion import DiffusionObjective
from e2d2.model import DiffusionLM
from e2d2.train import pack_documents, train


def test_tiny_e2d2_validation_nelbo_falls():
    torch.manual_seed(0)
    tok = load_tokenizer("bytes")
    docs = list(iter_documents("kjv"))[:400]
    rows = pack_documents(tok.encode_batch(docs), 64, tok.eod)
    cfg = ModelConfig(variant="e2d2", vocab_size=tok.vocab_size, mask_token_id=tok.mask_id, hidden_size=64,
                      ffn_hidden_size=192, num_attention_heads=4, num_query_groups=2, num_layers=2,
                      num_decoder_layers=1, seq_length=64, block_size=4)
    history = train(DiffusionLM(cfg), DiffusionObjective(cfg, DiffusionConfig()), rows[:-64], rows[-64:],
                    TrainConfig(steps=80, batch_size=16, warmup_steps=10, eval_every=80, eval_batches=4))
    start, end = history.evals[0][1], history.evals[-1][1]
    # Measured (seed 0): 5.56 ± 0.12 -> 3.07 ± 0.07 nats/token. Uniform over 259 byte tokens is log(259) = 5.56.
    assert start.nelbo > 5.3
    assert end.nelbo < 3.6, (start, end)
    assert end.nelbo < start.nelbo - 10 * (start.std_error + end.std_error)
    assert history.losses[-10:] and sum(history.losses[-10:]) < sum(history.losses[:10])
