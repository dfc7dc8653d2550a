"""The initial weights of a seed, one tensor (one row chunk) at a time, for any slice.

One rule, used by the reference model (``DiffusionLM.reset_parameters``) and by the
megatron engine's per-shard initialisation (``megatron_ext.mapping.initialize_at_seed``),
so both hold the same weights for the same seed under every TP/PP layout:

* 1-D tensors (the RMSNorm weights) are ones;
* output projections (``attn.o_proj``, ``mlp.down_proj``) are Normal(0, init_std /
  sqrt(2 x depth)), depth = encoder + decoder layers (GPT-2 / Megatron scaling);
* every other matrix (embedding, q/k/v, gate/up, untied LM head) is Normal(0, init_std).

A tensor is drawn in chunks of whole rows (dim 0) of about ``CHUNK_ELEMENTS`` elements, the
row count fixed by the full shape alone; chunk ``c`` of tensor ``name`` comes from a CPU
generator seeded with a hash of ``(seed, name, c)``. Any slice of the full tensor (a
tensor-parallel shard along any dim) is therefore produced by drawing only the chunks its
rows touch, never the whole tensor (the 1B config's 151936 x 2048 embedding is 75 chunks
of 16 MiB), and equals the same slice of the full tensor bit for bit. Values are drawn in
fp32 on CPU whatever the target's device or dtype, so they do not depend on either.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

from e2d2.config import ModelConfig

CHUNK_ELEMENTS = 1 << 22  # 16 MiB of fp32 per chunk: bounds the transient memory of a draw

_OUTPUT_PROJECTIONS = ("o_proj.weight", "down_proj.weight")


def tensor_std(cfg: ModelConfig, name: str, shape: tuple[int, ...]) -> float | None:
    """The standard deviation reference tensor ``name`` is drawn with; None: all ones."""
    if len(shape) == 1:
        return None
    if name.endswith(_OUTPUT_PROJECTIONS):
        return cfg.init_std / math.sqrt(2.0 * (cfg.num_layers + cfg.num_decoder_layers))
    return cfg.init_std


def chunk_rows(shape: tuple[int, ...]) -> int:
    """Rows of dim 0 per chunk: a function of the full shape only, never of a layout."""
    row = math.prod(shape[1:])
    return max(1, CHUNK_ELEMENTS // max(row, 1))


def _chunk_seed(seed: int, name: str, chunk: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{name}/{chunk}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _as_slices(index: tuple[slice, ...], shape: tuple[int, ...]) -> list[range]:
    """``index`` (step-1 slices, missing trailing dims = whole) as one range per dim."""
    if len(index) > len(shape):
        raise ValueError(f"index {index} has more dims than shape {shape}")
    ranges = []
    for dim, size in enumerate(shape):
        s = index[dim] if dim < len(index) else slice(None)
        start, stop, step = s.indices(size)
        if step != 1:
            raise ValueError(f"index {index}: only step-1 slices are supported")
        ranges.append(range(start, max(start, stop)))
    return ranges


@torch.no_grad()
def fill_(out: torch.Tensor, cfg: ModelConfig, seed: int, name: str,
          full_shape: tuple[int, ...], index: tuple[slice, ...] = ()) -> torch.Tensor:
    """Write ``full[index]`` into ``out``, where ``full`` is reference tensor ``name`` of shape
    ``full_shape`` at ``seed``, drawing only the row chunks ``index`` touches.

    ``index``: step-1 slices per dim, e.g. ``(slice(r0, r1),)`` for a column-parallel shard
    ``[out / TP, in]`` or ``(slice(None), slice(c0, c1))`` for a row-parallel one. ``out``
    must have the slice's shape (any dtype/device: values are drawn in fp32 on CPU and
    cast). A meta ``out`` is left alone. Returns ``out``.
    """
    full_shape = tuple(full_shape)
    ranges = _as_slices(index, full_shape)
    want = tuple(len(r) for r in ranges)
    if tuple(out.shape) != want:
        raise ValueError(f"{name}: out {tuple(out.shape)} is not the slice {want} of {full_shape}")
    if out.is_meta:
        return out
    std = tensor_std(cfg, name, full_shape)
    if std is None:
        return out.fill_(1.0)
    rows, rest = ranges[0], tuple(slice(r.start, r.stop) for r in ranges[1:])
    per_chunk = chunk_rows(full_shape)
    generator = torch.Generator(device="cpu")
    for chunk in range(rows.start // per_chunk, -(-rows.stop // per_chunk)):
        first, last = chunk * per_chunk, min((chunk + 1) * per_chunk, full_shape[0])
        generator.manual_seed(_chunk_seed(seed, name, chunk))
        values = torch.randn((last - first, *full_shape[1:]), generator=generator,
                             dtype=torch.float32, device="cpu").mul_(std)
        lo, hi = max(first, rows.start), min(last, rows.stop)
        out[lo - rows.start:hi - rows.start].copy_(values[(slice(lo - first, hi - first), *rest)])
    return out


def materialize(cfg: ModelConfig, seed: int, name: str, full_shape: tuple[int, ...],
                index: tuple[slice, ...] = ()) -> torch.Tensor:
    """``full[index]`` of reference tensor ``name`` at ``seed`` as a new fp32 CPU tensor."""
    shape = tuple(len(r) for r in _as_slices(index, tuple(full_shape)))
    return fill_(torch.empty(shape), cfg, seed, name, full_shape, index)


def initialize_(model: nn.Module, cfg: ModelConfig, seed: int) -> None:
    """Every parameter of a reference-named ``model`` (``DiffusionLM``) from ``seed``."""
    for name, param in model.named_parameters():
        fill_(param.data, cfg, seed, name, tuple(param.shape))


def seed_from_global_rng() -> int:
    """A seed drawn from torch's global CPU generator, so ``torch.manual_seed(s)`` followed by
    ``DiffusionLM(cfg)`` stays reproducible."""
    return int(torch.randint(0, 1 << 62, (1,), device="cpu"))
