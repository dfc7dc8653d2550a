"""The pretraining data of a run: preprocessed directories -> this rank's micro-batches.

Built on ``data_tools.batches`` (megatron-core's GPTDataset, BlendedMegatronDatasetBuilder,
and the data-parallel batch order). The training samples form one fixed sequence, built
epoch by epoch (``build_train_dataset``: each epoch megatron's one-epoch dataset with its own
seed from ``run.seed``), so sample ``i`` does not depend on ``train.steps``. A run consumes it
in order: a step of ``B = train.batch_size`` samples from ``consumed_samples`` on takes
``[consumed, consumed + B)``, micro-batch ``j`` of data-parallel rank ``r`` holding
``consumed + j x mb x DP + r x mb + [0, mb)``, whatever the layout. A run resumed from
``consumed_samples`` therefore continues exactly, with a longer ``train.steps`` too; with
another ``batch_size`` it continues from the same sample with larger or smaller steps.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import torch

from data_tools.batches import (
    DataConfig,
    PretrainingBatchSampler,
    build_gpt_datasets,
    build_train_dataset,
    make_dataloader,
)
from data_tools.tokenizer import E2D2Tokenizer
from e2d2.errors import UserError
from launchers.config import RunConfig

MicroBatch = tuple[torch.Tensor, list[int]]  # tokens [mb, L] and their global sample ids


class PretrainData:
    """This rank's training and evaluation micro-batches (collective to build): at least
    ``train_samples`` training samples (the consumed-sample count at the run's last step)."""

    def __init__(self, cfg: RunConfig, tokenizer: E2D2Tokenizer, dp_rank: int, dp_size: int,
                 micro_batch_size: int, cache_dir: Path, train_samples: int) -> None:
        self.cfg, self.dp_rank, self.dp_size, self.mb = cfg, dp_rank, dp_size, micro_batch_size
        self.global_batch = cfg.train.batch_size
        self.accumulation = self.global_batch // (micro_batch_size * dp_size)
        paths = [Path(p) for p in cfg.data.paths]
        weights = tuple(cfg.data.weights) if cfg.data.weights else None
        config = DataConfig(
            tuple(str(p / "train") for p in paths), tuple(str(p / "valid") for p in paths),
            seq_length=cfg.model.seq_length, block_size=cfg.model.diffusion_block_size,
            seed=cfg.run.seed, train_weights=weights, cache_dir=str(cache_dir))
        self.train = build_train_dataset(config, tokenizer, train_samples)
        self.valid = build_gpt_datasets(config, tokenizer, splits=("valid",))[1]
        per_round = micro_batch_size * dp_size
        wanted = cfg.train.eval_batches * self.global_batch
        self.eval_samples = min(wanted, len(self.valid) // per_round * per_round)
        if self.eval_samples == 0:
            raise UserError(f"the valid split has {len(self.valid)} samples of "
                            f"{cfg.model.seq_length} tokens, fewer than one micro-batch per "
                            f"data-parallel rank ({per_round}); preprocess with more --valid-docs")

    def _stream(self, dataset, consumed: int) -> Iterator[MicroBatch]:
        # The loader iterates the same sampler arithmetic; the sampler gives the sample ids.
        ids = PretrainingBatchSampler(len(dataset), consumed, self.mb, self.dp_rank, self.dp_size)
        loader = make_dataloader(dataset, consumed, self.mb, self.dp_rank, self.dp_size,
                                 self.cfg.data.num_workers)
        vocab = self.cfg.model.vocab_size
        for sample_ids, batch in zip(ids, loader, strict=True):
            tokens = batch["tokens"].long()
            if int(tokens.max()) >= vocab:  # damage the start-up check cannot see (no scan)
                raise UserError(f"a sample of data.path holds token id {int(tokens.max())}, not "
                                f"below model.vocab_size={vocab}: the data is damaged; find it "
                                "with `e2d2 data inspect DIR --verify`")
            yield tokens, sample_ids

    def train_steps(self, consumed_samples: int) -> Iterator[list[MicroBatch]]:
        """This rank's micro-batches of every global step after ``consumed_samples``."""
        stream = self._stream(self.train, consumed_samples)
        while True:
            yield list(itertools.islice(stream, self.accumulation))

    def eval_batches(self) -> list[MicroBatch]:
        """This rank's share of the first ``eval_samples`` validation samples."""
        rounds = self.eval_samples // (self.mb * self.dp_size)
        return list(itertools.islice(self._stream(self.valid, 0), rounds))
