"""Training batches from our indexed datasets, through megatron-core's GPTDataset.

megatron-core does the heavy lifting: packing documents (EOD-separated) into fixed-length
samples, a seeded shuffle, weighted blending of several datasets, and cached indices.
This module adds a tokenizer adapter, a validated config, and the data-parallel batch order.

Sequence length: megatron's GPT samples are ``L + 1`` tokens so that AR inputs and labels
are both ``L`` long. Diffusion trains on ``L`` tokens, so we set
``add_extra_token_to_sequence=False``: samples are disjoint ``L``-token windows and every
token is used once per epoch. ``labels`` is then ``tokens`` shifted left with the last label
masked in ``loss_mask`` (an AR baseline loses one target per sample, 1/L of the data).

Epochs: megatron shuffles all the epochs it builds together, so its sample ``i`` depends on
how many samples were asked for. ``build_train_dataset`` therefore builds the training data
epoch by epoch: epoch ``e`` is megatron's one-epoch dataset (for a blend, the blend of one
epoch's worth of samples) with the seed ``epoch_seed(seed, e)``, and sample ``i`` is sample
``i mod S`` of epoch ``i // S``. Sample ``i`` is then the same however long the run is.

Order: sample ``i`` of the (already shuffled) dataset is consumed at global position ``i``;
the micro-batches from ``consumed_samples`` on are ``consumed_samples + k*B + r*mbs + [0, mbs)``
with ``B = micro_batch_size * dp_size``: data-parallel rank ``r`` takes the ``r``-th
micro-batch of each round. Resuming from ``consumed_samples`` therefore continues exactly
where a run stopped, for any rank and any batch size.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from e2d2.errors import ConfigError, UserError

_MEGATRON_NO_PAD = -1  # megatron's own "no pad token" sentinel; never a real token id


class MegatronTokenizer:
    """What megatron's GPTDataset reads from ``config.tokenizer``."""

    def __init__(self, tokenizer) -> None:
        self.eod = tokenizer.eod
        self.vocab_size = tokenizer.vocab_size
        # Padded positions are loss-masked and pad ids are zeroed; a pad id that doubles as
        # EOD/BOS (GPT-2) would also mask real document boundaries, so use the sentinel.
        distinct = tokenizer.pad not in (tokenizer.eod, tokenizer.bos, tokenizer.mask_id)
        self.pad = tokenizer.pad if distinct else _MEGATRON_NO_PAD
        self.unique_identifiers = tokenizer.unique_identifiers


@dataclass(frozen=True)
class DataConfig:
    """Which prefixes to train/validate on and how to cut them into samples."""

    train_prefixes: tuple[str, ...]
    valid_prefixes: tuple[str, ...]
    seq_length: int
    block_size: int
    seed: int = 1234
    train_weights: tuple[float, ...] | None = None
    valid_weights: tuple[float, ...] | None = None
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.seq_length < 1 or self.seq_length % self.block_size:
            raise ConfigError(
                f"seq_length {self.seq_length} must be a positive multiple of block_size "
                f"{self.block_size}: a diffusion block never straddles two samples"
            )
        for name in ("train", "valid"):
            prefixes = getattr(self, f"{name}_prefixes")
            weights = getattr(self, f"{name}_weights")
            if not prefixes:
                raise ConfigError(f"{name}_prefixes is empty: name at least one dataset prefix")
            for prefix in prefixes:
                if not (Path(f"{prefix}.bin").is_file() and Path(f"{prefix}.idx").is_file()):
                    raise ConfigError(
                        f"{name} dataset {prefix}: no {prefix}.bin/.idx; run "
                        "`e2d2 data preprocess` and pass OUTPUT/train, OUTPUT/valid"
                    )
            if weights is not None and (
                len(weights) != len(prefixes) or any(w <= 0 for w in weights)
            ):
                raise ConfigError(
                    f"{name}_weights {weights}: need one positive weight per prefix {prefixes}"
                )

    @classmethod
    def from_directory(cls, directory: str | Path, **kwargs) -> DataConfig:
        """The train/valid prefixes written by ``e2d2 data preprocess --output directory``."""
        directory = Path(directory)
        return cls((str(directory / "train"),), (str(directory / "valid"),), **kwargs)


def build_gpt_datasets(
    config: DataConfig, tokenizer, train_samples: int | None = None, valid_samples: int | None = None,
    splits: tuple[str, ...] = ("train", "valid"),
):
    """(train, valid) megatron datasets; ``None`` samples means one epoch. A split left out
    of ``splits`` is not built (``None`` in its place).

    With weights (a blend), ``train_samples`` is required: megatron sizes each member from it.
    Must be called on every rank when torch.distributed is initialized (rank 0 builds and
    caches the indices first, the others then load them).
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    blends = [
        (list(config.train_prefixes), _list(config.train_weights)) if "train" in splits else None,
        (list(config.valid_prefixes), _list(config.valid_weights)) if "valid" in splits else None,
        None,  # no test split
    ]
    for blend, samples, name in zip(
        blends[:2], (train_samples, valid_samples), ("train", "valid"), strict=True
    ):
        if blend is None:
            continue
        prefixes, weights = blend
        if weights is not None and samples is None:
            raise ConfigError(f"{name}_weights need {name}_samples (the number of samples to draw)")
        blended = len(prefixes) > 1
        if blended and config.cache_dir and not torch.distributed.is_initialized():
            raise UserError(
                "cache_dir with a blend needs torch.distributed initialized (megatron-core "
                "writes the blend cache from rank 0); initialize it or leave cache_dir unset"
            )
    gpt_config = GPTDatasetConfig(
        random_seed=config.seed,
        sequence_length=config.seq_length,
        blend_per_split=blends,
        tokenizer=MegatronTokenizer(tokenizer),
        path_to_cache=config.cache_dir,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,  # the diffusion masks are built by the model
        add_extra_token_to_sequence=False,  # L-token samples (see the module docstring)
    )
    train, valid, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [train_samples, valid_samples, None], lambda: True, gpt_config
    ).build()
    return train, valid


def _list(weights):
    return None if weights is None else list(weights)


def epoch_samples(config: DataConfig) -> int:
    """Samples of one epoch of the training prefixes (all of them, for a blend): disjoint
    ``seq_length``-token windows, the last partial one dropped, as megatron's GPTDataset cuts."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    total = 0
    for prefix in config.train_prefixes:
        dataset = IndexedDataset(prefix)  # alive while its memory-mapped lengths are read
        total += int(dataset.sequence_lengths.sum(dtype=np.int64)) // config.seq_length
    return total


def epoch_seed(seed: int, epoch: int) -> int:
    """The shuffle seed of ``epoch``: the run's seed for the first (a run within one epoch
    keeps megatron's order), then independent seeds derived from ``(seed, epoch)``."""
    if epoch == 0:
        return seed
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


class EpochDataset(torch.utils.data.Dataset):
    """Whole epochs one after another: sample ``i`` is sample ``i mod S`` of epoch ``i // S``."""

    def __init__(self, epochs: list, samples_per_epoch: int) -> None:
        short = [len(e) for e in epochs if len(e) < samples_per_epoch]
        if short:
            raise ValueError(f"an epoch of {short[0]} samples, expected {samples_per_epoch}")
        self.epochs, self.samples_per_epoch = epochs, samples_per_epoch

    def __len__(self) -> int:
        return len(self.epochs) * self.samples_per_epoch

    def __getitem__(self, index: int):
        epoch, sample = divmod(index, self.samples_per_epoch)
        return self.epochs[epoch][sample]


def build_train_dataset(config: DataConfig, tokenizer, num_samples: int) -> EpochDataset:
    """At least ``num_samples`` training samples, whole epochs built one by one (see the module
    docstring): sample ``i`` does not depend on ``num_samples``. Collective, like
    ``build_gpt_datasets``."""
    per_epoch = epoch_samples(config)
    if per_epoch == 0:
        raise UserError(f"the training data {', '.join(config.train_prefixes)} holds fewer than "
                        f"{config.seq_length} tokens: not one sample")
    epochs = [
        build_gpt_datasets(dataclasses.replace(config, seed=epoch_seed(config.seed, e)), tokenizer,
                           train_samples=per_epoch, splits=("train",))[0]
        for e in range(max(1, math.ceil(num_samples / per_epoch)))
    ]
    return EpochDataset(epochs, per_epoch)


class PretrainingBatchSampler:
    """Index lists of one data-parallel rank's micro-batches, from ``consumed_samples`` on.

    Only whole global batches are drawn: the last partial one is dropped so that every rank
    takes the same number of steps.
    """

    def __init__(
        self,
        num_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
    ) -> None:
        if micro_batch_size < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ConfigError(
                f"micro_batch_size {micro_batch_size}, dp_rank {dp_rank}, dp_size {dp_size}: "
                "need micro_batch_size >= 1 and 0 <= dp_rank < dp_size"
            )
        global_batch = micro_batch_size * dp_size
        if consumed_samples < 0:
            raise ConfigError(f"consumed_samples {consumed_samples} must be non-negative")
        if consumed_samples + global_batch > num_samples:
            raise UserError(
                f"consumed_samples {consumed_samples} leaves no full global batch of "
                f"{global_batch} in {num_samples} samples; build the dataset with more samples"
            )
        self.num_samples = num_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.global_batch = global_batch

    def __len__(self) -> int:
        return (self.num_samples - self.consumed_samples) // self.global_batch

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(len(self)):
            start = self.consumed_samples + step * self.global_batch
            first = start + self.dp_rank * self.micro_batch_size
            yield list(range(first, first + self.micro_batch_size))


def make_dataloader(
    dataset,
    consumed_samples: int,
    micro_batch_size: int,
    dp_rank: int = 0,
    dp_size: int = 1,
    num_workers: int = 0,
) -> torch.utils.data.DataLoader:
    """Micro-batches ``{"tokens": [B, L] int64, "labels", "loss_mask", "position_ids"}``."""
    sampler = PretrainingBatchSampler(
        len(dataset), consumed_samples, micro_batch_size, dp_rank, dp_size
    )
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=False
    )
