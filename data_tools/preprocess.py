"""``e2d2 data preprocess``: inputs -> shard(s) -> merged train/valid indexed datasets.

Three ways to run, one code path (tokenize a shard, then merge the shards in order):

* one process: a single shard, merged at once;
* under MPI (``mpirun``/``srun``, detected from the environment): rank r writes shard r,
  rank 0 merges once every rank has finished;
* ``--num-shards N --shard-index I`` (e.g. a SLURM array): shard I is written to
  ``OUTPUT/shards/`` and ``e2d2 data merge OUTPUT`` joins them when all N exist.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from data_tools.atomic import atomic_path, remove
from data_tools.encode import choose_dtype
from data_tools.merge import SHARDS_DIR, VALID_SHARDS, check_output_free, merge
from data_tools.shard import PreprocessConfig, shard_prefix, write_shard
from data_tools.sources import expand_inputs
from data_tools.split import assign_pieces
from data_tools.tokenizer import load_tokenizer
from e2d2.errors import UserError


def mpi_world():
    """mpi4py's COMM_WORLD when launched as several MPI ranks, else None."""
    size = int(os.environ.get("OMPI_COMM_WORLD_SIZE") or os.environ.get("PMI_SIZE") or 1)
    if size <= 1:
        return None
    try:
        from mpi4py import MPI
    except ModuleNotFoundError as exc:
        raise UserError("running under MPI needs mpi4py: pip install 'e2d2[mpi]'") from exc
    return MPI.COMM_WORLD


def _collectively(comm, action, *args):
    """Run ``action`` on this rank; then every rank learns whether any rank failed, so none
    waits forever for a dead peer. Without MPI this is just ``action(*args)``."""
    if comm is None:
        return action(*args)
    result = error = None
    try:
        result = action(*args)
    except Exception as exc:
        error = exc
    messages = comm.allgather(None if error is None else str(error))
    if error is not None:
        raise error
    failed = [(rank, message) for rank, message in enumerate(messages) if message is not None]
    if failed:
        rank, message = failed[0]
        raise UserError(f"MPI rank {rank} failed: {message}")
    return result


def _write_own_shard(config: PreprocessConfig, shards_dir: Path):
    """Write this process's shard; return the tokenizer, loaded once for shard and merge."""
    check_output_free(config.output, config.overwrite)
    tokenizer = load_tokenizer(config.tokenizer)
    choose_dtype(tokenizer.id_bound, config.dtype)  # fail before any work
    sources = expand_inputs(config.inputs)
    prefix = shard_prefix(shards_dir, config.shard_index, config.num_shards)
    if Path(f"{prefix}.json").exists() and not config.overwrite:
        raise UserError(f"{prefix}.json exists; pass --overwrite to redo this shard")
    if config.shard_index == 0:
        remove(shards_dir / "tokenizer")
        with atomic_path(shards_dir / "tokenizer") as tmp:
            tokenizer.save(tmp)
    pieces = assign_pieces(sources, config.num_shards, config.shard_index)
    write_shard(config, sources, pieces, tokenizer, prefix)
    if config.valid_inputs and config.shard_index == 0:  # the separate validation set
        valid = expand_inputs(config.valid_inputs)
        write_shard(replace(config, inputs=config.valid_inputs, num_shards=1, shard_index=0),
                    valid, assign_pieces(valid, 1, 0), tokenizer,
                    shard_prefix(shards_dir / VALID_SHARDS, 0, 1))
    return tokenizer


def preprocess(config: PreprocessConfig) -> dict | None:
    """Run ``config``; return the manifest, or None when only a manual shard was written."""
    comm = mpi_world()
    if comm is None and config.num_shards > 1:  # manual sharding: merge happens later
        _write_own_shard(config, config.output / SHARDS_DIR)
        return None
    if comm is None:
        staging = config.output / f".shards-{os.getpid()}"
    else:
        if config.num_shards > 1 and config.num_shards != comm.Get_size():
            raise UserError(
                f"--num-shards {config.num_shards} under an MPI world of {comm.Get_size()}: "
                "drop --num-shards/--shard-index, MPI assigns one shard per rank"
            )
        config = replace(config, num_shards=comm.Get_size(), shard_index=comm.Get_rank())
        staging = config.output / f".shards-{comm.bcast(os.getpid(), root=0)}"
    try:
        tokenizer = _collectively(comm, _write_own_shard, config, staging)
        if config.shard_index == 0:
            return _collectively(
                comm, merge, config.output, config.overwrite, staging, tokenizer
            )
        return _collectively(comm, lambda: None)
    finally:
        if config.shard_index == 0:  # every rank is past its writes here
            remove(staging)
