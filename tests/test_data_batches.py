"""megatron-core GPTDataset batches from our files: deterministic, covering, resumable, sharded."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from test_data_helpers import e2d2, pydoc_texts, read_documents, write_jsonl

from data_tools.batches import (
    DataConfig,
    PretrainingBatchSampler,
    build_gpt_datasets,
    build_train_dataset,
    epoch_samples,
    epoch_seed,
    make_dataloader,
)
from data_tools.tokenizer import load_tokenizer
from e2d2.errors import ConfigError, UserError

SEQ, BLOCK = 64, 16


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("batches")
    corpus = write_jsonl(tmp / "c.jsonl", pydoc_texts(12))
    out = tmp / "out"
    assert e2d2("data", "preprocess", "--input", corpus, "--tokenizer", "gpt2",
                "--output", out, "--valid-docs", 2) == 0
    return out


def _datasets(data_dir, tmp_path, seed=7, name="cache", **kwargs):
    config = DataConfig.from_directory(
        data_dir, seq_length=SEQ, block_size=BLOCK, seed=seed, cache_dir=str(tmp_path / name)
    )
    return build_gpt_datasets(config, load_tokenizer(data_dir / "tokenizer"), **kwargs)


def _all_tokens(dataset) -> np.ndarray:
    return np.stack([dataset[i]["tokens"].numpy() for i in range(len(dataset))])


def test_samples_are_deterministic_given_the_seed(data_dir, tmp_path):
    a, _ = _datasets(data_dir, tmp_path, seed=7, name="a")
    b, _ = _datasets(data_dir, tmp_path, seed=7, name="b")  # rebuilt, not read from a's cache
    c, _ = _datasets(data_dir, tmp_path, seed=8, name="c")
    assert np.array_equal(_all_tokens(a), _all_tokens(b))
    assert not np.array_equal(_all_tokens(a), _all_tokens(c))


def test_one_epoch_covers_the_training_split(data_dir, tmp_path):
    train, valid = _datasets(data_dir, tmp_path)
    docs = read_documents(data_dir / "train")
    stream = np.concatenate([docs[d] for d in train.document_index])  # shuffled doc order
    assert len(train) == len(stream) // SEQ  # disjoint L-token samples, last partial dropped
    tokens = _all_tokens(train)
    in_stream_order = tokens[np.argsort(train.shuffle_index)]
    assert np.array_equal(in_stream_order.reshape(-1), stream[: len(train) * SEQ])
    assert sorted(train.document_index.tolist()) == list(range(len(docs)))
    assert len(valid) == sum(map(len, read_documents(data_dir / "valid"))) // SEQ


def test_sample_fields_and_labels(data_dir, tmp_path):
    train, _ = _datasets(data_dir, tmp_path)
    sample = train[0]
    assert sample["tokens"].shape == (SEQ,) and "attention_mask" not in sample
    assert torch.equal(sample["labels"][:-1], sample["tokens"][1:])
    assert sample["loss_mask"][-1] == 0 and sample["loss_mask"][:-1].all()


def test_more_samples_than_an_epoch(data_dir, tmp_path):
    train, _ = _datasets(data_dir, tmp_path, train_samples=5000)
    assert len(train) >= 5000


def test_resume_and_data_parallel_shards(data_dir, tmp_path):
    train, _ = _datasets(data_dir, tmp_path)
    mbs, dp = 2, 3
    full = [b["tokens"] for b in make_dataloader(train, 0, mbs * dp, 0, 1)]
    ranks = [list(make_dataloader(train, 0, mbs, r, dp)) for r in range(dp)]
    for step, global_batch in enumerate(full):  # the ranks' micro-batches tile the global one
        assert torch.equal(torch.cat([ranks[r][step]["tokens"] for r in range(dp)]), global_batch)
    resumed = list(make_dataloader(train, 2 * mbs * dp, mbs, 1, dp))
    assert len(resumed) == len(ranks[1]) - 2
    assert all(torch.equal(x["tokens"], y["tokens"]) for x, y in zip(resumed, ranks[1][2:], strict=True))


def test_sampler_validates(data_dir):
    with pytest.raises(ConfigError, match="non-negative"):
        PretrainingBatchSampler(100, -2, 2, 0, 2)
    with pytest.raises(ConfigError, match="dp_rank"):
        PretrainingBatchSampler(100, 0, 2, 2, 2)
    with pytest.raises(UserError, match="no full global batch"):
        PretrainingBatchSampler(100, 100, 2, 0, 2)
    assert [list(b) for b in PretrainingBatchSampler(10, 4, 2, 1, 2)] == [[6, 7]]
    # after a change of batch size the count of consumed samples need not be a whole round
    assert [list(b) for b in PretrainingBatchSampler(11, 3, 2, 1, 2)] == [[5, 6], [9, 10]]


def test_sample_i_does_not_depend_on_how_many_samples_are_built(data_dir, tmp_path):
    """megatron shuffles the epochs it builds together; the training data of a run is built
    epoch by epoch so that a longer run (a resume with more train.steps) sees the same samples
    in the same order, then more."""
    config = DataConfig.from_directory(data_dir, seq_length=SEQ, block_size=BLOCK, seed=7,
                                       cache_dir=str(tmp_path / "cache"))
    tokenizer = load_tokenizer(data_dir / "tokenizer")
    one_epoch, _ = build_gpt_datasets(config, tokenizer)
    short = build_train_dataset(config, tokenizer, num_samples=3)
    long = build_train_dataset(config, tokenizer, num_samples=2 * len(one_epoch) + 1)
    assert len(short) == epoch_samples(config) == len(one_epoch)
    assert len(long) == 3 * len(one_epoch)
    # the first epoch is megatron's one-epoch order, whatever the size asked for
    assert np.array_equal(_all_tokens(short), _all_tokens(one_epoch))
    assert np.array_equal(_all_tokens(long)[: len(short)], _all_tokens(short))
    # epoch e is megatron's one-epoch dataset with its own seed: reshuffled each epoch
    epochs = _all_tokens(long).reshape(3, len(one_epoch), SEQ)
    for e in (1, 2):
        alone, _ = build_gpt_datasets(dataclasses.replace(config, seed=epoch_seed(7, e)),
                                      tokenizer)
        assert np.array_equal(epochs[e], _all_tokens(alone))
        assert not np.array_equal(epochs[e], epochs[e - 1])
    # megatron's own multi-epoch build reorders even the first epoch: what this avoids
    multi, _ = build_gpt_datasets(config, tokenizer, train_samples=len(long))
    assert not np.array_equal(_all_tokens(multi)[: len(short)], _all_tokens(short))


def test_config_validates(data_dir, tmp_path):
    with pytest.raises(ConfigError, match="multiple of block_size"):
        DataConfig.from_directory(data_dir, seq_length=100, block_size=16)
    with pytest.raises(ConfigError, match="e2d2 data preprocess"):
        DataConfig.from_directory(tmp_path, seq_length=64, block_size=16)
    with pytest.raises(ConfigError, match="one positive weight per prefix"):
        DataConfig.from_directory(data_dir, seq_length=64, block_size=16, train_weights=(1, 2))


def test_weighted_blend_of_two_datasets(data_dir, tmp_path):
    train = str(data_dir / "train")
    config = DataConfig(
        (train, train), (str(data_dir / "valid"),), SEQ, BLOCK, train_weights=(0.25, 0.75)
    )
    blend, _ = build_gpt_datasets(config, load_tokenizer("gpt2"), train_samples=400)
    assert len(blend) == 400
    shares = np.bincount(blend.dataset_index, minlength=2) / len(blend)
    assert abs(shares[1] - 0.75) < 0.02
