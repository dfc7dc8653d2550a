"""Canary: every megatron-core internal that megatron_ext.cpu_compat patches still looks the way
the patch expects. A megatron-core upgrade that moves one of them fails here, by name."""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch

from megatron_ext import cpu_compat
from megatron_ext.testing import spawn_gloo


def _source(module_name: str) -> str:
    return inspect.getsource(importlib.import_module(module_name))


def test_pinned_version_is_installed():
    assert cpu_compat._megatron_version() == cpu_compat.PINNED_VERSION


def test_other_version_is_refused(monkeypatch):
    monkeypatch.setattr(cpu_compat, "_installed", False)
    monkeypatch.setattr(cpu_compat, "_megatron_version", lambda: "0.99.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(cpu_compat.CpuCompatError, match="0.16.1.*found 0.99.0"):
        cpu_compat.install()


@pytest.mark.parametrize("module_name", cpu_compat.CUDA_FACTORY_MODULES)
def test_factory_modules_still_build_cuda_tensors(module_name):
    module = importlib.import_module(module_name)
    assert module.torch is torch or isinstance(module.torch, cpu_compat._CpuTorch)
    source = _source(module_name)
    assert 'device="cuda"' in source or "device='cuda'" in source, module_name


@pytest.mark.parametrize("module_name", cpu_compat.CUDA_TYPE_NAME_MODULES)
def test_type_name_modules_still_compare_cuda_type_strings(module_name):
    assert "'torch.cuda.FloatTensor'" in _source(module_name), module_name


def test_rng_internals_unchanged():
    from megatron.core.tensor_parallel import random as mp_random

    source = _source("megatron.core.tensor_parallel.random")
    # The tracker seeds and swaps states through exactly these calls.
    for fragment in (
        "torch.cuda.get_rng_state()",
        "torch.cuda.manual_seed(seed)",
        "_set_cuda_rng_state(orig_rng_state)",
        "torch.cuda.random.get_rng_state(device=device)",
    ):
        assert fragment in source, fragment
    params = inspect.signature(mp_random._set_cuda_rng_state).parameters
    assert list(params) == ["new_state", "device", "graph_safe"]


def test_device_queries_still_used_as_device_arguments():
    assert "device=torch.cuda.current_device()" in _source(
        "megatron.core.pipeline_parallel.p2p_communication"
    )
    assert "torch.cuda.synchronize()" in _source(
        "megatron.core.pipeline_parallel.p2p_communication"
    )
    assert ".cuda()" in _source("megatron.core.dist_checkpointing.exchange_utils")


# The patches are process-wide, so their behaviour is checked in a spawned rank (the harness
# installs them there) rather than in the pytest process, whose other tests must not see them.


def _cuda_factories_build_on_cpu_only_inside_megatron():
    from megatron.core.optimizer import clip_grads

    assert clip_grads.torch.zeros(2, device="cuda").device.type == "cpu"
    try:
        torch.zeros(2, device="cuda")
    except (AssertionError, RuntimeError):
        pass  # the process-wide torch is untouched
    else:
        raise AssertionError("torch.zeros(device='cuda') was redirected process-wide")


def _type_name_is_cuda_only_for_the_optimizer():
    from megatron.core.optimizer import optimizer

    t = torch.zeros(1)
    assert t.type() == "torch.FloatTensor"
    assert eval("t.type()", {"__name__": optimizer.__name__}, {"t": t}) == "torch.cuda.FloatTensor"


def _cuda_rng_seeds_the_cpu_generator():
    torch.cuda.manual_seed(3)
    a = torch.rand(4)
    torch.cuda.random.manual_seed(3)
    assert torch.equal(torch.rand(4), a)
    state = torch.cuda.get_rng_state()
    c = torch.rand(4)
    torch.cuda.set_rng_state(state)
    assert torch.equal(torch.rand(4), c)


def _megatron_rng_tracker_forks_seeded_states():
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

    draws = []
    for _ in range(2):
        tracker = CudaRNGStatesTracker()
        tracker.add("x", 11)
        torch.manual_seed(0)
        with tracker.fork("x"):
            draws.append(torch.rand(3))
    assert torch.equal(draws[0], draws[1])
    torch.manual_seed(0)
    assert not torch.equal(torch.rand(3), draws[0])


def _device_queries():
    assert torch.zeros(1, device=torch.cuda.current_device()).device.type == "cpu"
    torch.cuda.synchronize()
    assert torch.ones(1).cuda().device.type == "cpu"
    module = torch.nn.Linear(2, 2)
    assert module.cuda() is module


def _installed_checks(rank: int) -> None:
    assert cpu_compat.is_installed() and cpu_compat.install()  # installed once, idempotent
    for check in (_cuda_factories_build_on_cpu_only_inside_megatron,
                  _type_name_is_cuda_only_for_the_optimizer, _cuda_rng_seeds_the_cpu_generator,
                  _megatron_rng_tracker_forks_seeded_states, _device_queries):
        check()


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the patches are a no-op with CUDA")
def test_installed_patches_behave():
    spawn_gloo(_installed_checks, 1)
