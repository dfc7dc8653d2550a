"""Run megatron-core 0.16.1 on CPU with the gloo backend.

megatron-core assumes CUDA in a few dozen places. This module owns the one,
explicit list of patch points that lets the parallel layers, the pipeline
schedules, the optimizer (with gradient clipping and the distributed optimizer)
and ``dist_checkpointing`` run on CPU, so that every parallel layout can be
tested on a 2-core machine and debugged on a laptop.

Rules:
* ``install()`` is a no-op when CUDA is available: real GPUs never see a patch.
* It is pinned to ``PINNED_VERSION``; another megatron-core raises
  ``CpuCompatError`` instead of silently patching internals that may have moved.
  ``tests/test_megatron_cpu_compat.py`` asserts every patched internal still
  looks the way this file expects.
* Calling ``install()`` more than once is harmless.
* Patches only replace calls that would raise on a CPU-only torch, except the
  ``Tensor.type()`` answer, which is scoped to the megatron modules that
  compare it against ``'torch.cuda.*Tensor'`` strings.
"""

from __future__ import annotations

import importlib
import sys
import types
import warnings
from typing import Any

import torch

PINNED_VERSION = "0.16.1"

# Modules that build tensors with ``device='cuda'`` (or ``torch.cuda.current_device()``)
# on paths that CPU training reaches: gradient clipping, optimizer scalars, the
# schedules' token counter, dist_checkpointing's save verification and shard
# exchange, the rerun state machine's reductions, tensor_parallel's broadcast, the
# default causal mask of megatron's local attention and the non-Apex fallback of
# multi_tensor_l2norm (megatron.core.utils).
CUDA_FACTORY_MODULES: tuple[str, ...] = (
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.rerun_state_machine",
    "megatron.core.tensor_parallel.data",
    "megatron.core.transformer.utils",
    "megatron.core.utils",
)

# Modules that accept a parameter only if ``param.type()`` is a
# ``'torch.cuda.{Float,Half,BFloat16}Tensor'`` string.
CUDA_TYPE_NAME_MODULES: tuple[str, ...] = (
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.clip_grads",
)

# Tensor factories whose ``device=`` argument is rewritten from CUDA to CPU.
_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "empty_like", "zeros_like", "arange")

_CPU = torch.device("cpu")
_installed = False


class CpuCompatError(RuntimeError):
    """The installed megatron-core is not the version these patches were written for."""


def _megatron_version() -> str:
    from megatron.core import package_info

    return package_info.__version__


def _to_cpu_device(device: Any) -> Any:
    """Map a CUDA device spec (``'cuda'``, ``'cuda:0'``, ``torch.device('cuda')``, int) to CPU."""
    if isinstance(device, int) or (isinstance(device, str) and device.startswith("cuda")):
        return _CPU
    if isinstance(device, torch.device) and device.type == "cuda":
        return _CPU
    return device


def _cpu_factory(factory):
    def wrapper(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        return factory(*args, **kwargs)

    wrapper.__wrapped__ = factory
    return wrapper


class _CpuTorch(types.ModuleType):
    """Stands in for ``torch`` inside one megatron module: factories build on CPU.

    Every other attribute is the real ``torch`` one, so ``isinstance(x, torch.Tensor)``
    and ``torch.distributed`` behave exactly as before.
    """

    def __init__(self) -> None:
        super().__init__("torch")
        for name in _FACTORIES:
            setattr(self, name, _cpu_factory(getattr(torch, name)))

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


def _patch_cuda_factories() -> None:
    """Patch 1: ``torch.zeros(..., device='cuda')`` etc. in the modules listed above.

    Only those modules see the CPU-mapping ``torch``; the process-wide factories are
    untouched, so no other code pays for the wrapper.
    """
    cpu_torch = _CpuTorch()
    for name in CUDA_FACTORY_MODULES:
        importlib.import_module(name).torch = cpu_torch


def _patch_tensor_type_names() -> None:
    """Patch 2: ``param.type() == 'torch.cuda.FloatTensor'`` checks in the optimizer.

    Answering with the CUDA name only when the caller is one of those megatron
    modules keeps ``Tensor.type()`` truthful for everyone else.
    """
    original = torch.Tensor.type
    callers = frozenset(CUDA_TYPE_NAME_MODULES)

    def type_(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if args or kwargs or sys._getframe(1).f_globals.get("__name__") not in callers:
            return result
        return result.replace("torch.", "torch.cuda.", 1) if not self.is_cuda else result

    type_.__wrapped__ = original
    torch.Tensor.type = type_


def _patch_cuda_moves() -> None:
    """Patch 3: ``Tensor.cuda()`` / ``Module.cuda()`` (optimizer state reload, tied
    embedding setup, dist_checkpointing exchange) keep the data on CPU."""

    def tensor_cuda(self, *args, **kwargs):
        return self

    def module_cuda(self, *args, **kwargs):
        return self

    torch.Tensor.cuda = tensor_cuda
    torch.nn.Module.cuda = module_cuda


def _patch_rng() -> None:
    """Patch 4: CUDA RNG get/set/seed drive the CPU generator.

    megatron's model-parallel RNG tracker seeds and swaps "CUDA" RNG states; unless
    they are the CPU generator's, dropout and initialisation inside
    ``get_cuda_rng_tracker().fork()`` would draw from unseeded states.
    Both ``torch.cuda`` and ``torch.cuda.random`` are patched because megatron
    calls each of them.
    """

    def get_rng_state(device: Any = "cuda") -> torch.Tensor:
        return torch.get_rng_state()

    def set_rng_state(new_state: torch.Tensor, device: Any = "cuda") -> None:
        torch.set_rng_state(new_state)

    def manual_seed(seed: int) -> None:
        torch.default_generator.manual_seed(int(seed))

    for namespace in (torch.cuda, torch.cuda.random):
        namespace.get_rng_state = get_rng_state
        namespace.set_rng_state = set_rng_state
        namespace.manual_seed = manual_seed

    # Patch 5: megatron's own non-cloning setter goes through torch.cuda.default_generators.
    from megatron.core.tensor_parallel import random as mp_random

    def _set_cuda_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False):
        torch.set_rng_state(new_state)

    mp_random._set_cuda_rng_state = _set_cuda_rng_state


def _patch_device_queries() -> None:
    """Patch 6 and 7: ``torch.cuda.current_device()`` is used as a ``device=`` argument
    (p2p shape exchange, DDP buffers, distributed optimizer); ``torch.cuda.synchronize()``
    is called by p2p and dist_checkpointing. On CPU there is one device and nothing
    asynchronous to wait for."""
    torch.cuda.current_device = lambda: _CPU
    torch.cuda.synchronize = lambda device=None: None


def _filter_warnings() -> None:
    """Patch 8: warnings that are always true on CPU and bury real ones: the CUDA-only fused
    kernels (TE, Apex) are missing, and CUDA_DEVICE_MAX_CONNECTIONS is unset."""
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    warnings.filterwarnings("ignore", message="Apex is not installed")
    # Advice about a CUDA scheduling variable, issued by every tensor-parallel linear.
    warnings.filterwarnings("ignore", message="When using async grad allreduce it is recommended "
                            "to set the environment variable CUDA_DEVICE_MAX_CONNECTIONS")


def install() -> bool:
    """Install every patch once. Returns True if patches are active, False on a CUDA machine.

    Raises:
        CpuCompatError: megatron-core is not ``PINNED_VERSION``.
    """
    global _installed
    if torch.cuda.is_available():
        return False
    if _installed:
        return True
    version = _megatron_version()
    if version != PINNED_VERSION:
        raise CpuCompatError(
            f"megatron_ext.cpu_compat patches megatron-core {PINNED_VERSION} internals, "
            f"found {version}; pin megatron-core=={PINNED_VERSION} or update the patch "
            "points and tests/test_megatron_cpu_compat.py"
        )
    _filter_warnings()  # first: importing the patched modules emits the warning
    _patch_cuda_factories()
    _patch_tensor_type_names()
    _patch_cuda_moves()
    _patch_rng()
    _patch_device_queries()
    _installed = True
    return True


def is_installed() -> bool:
    return _installed
