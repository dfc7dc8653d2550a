"""Canary: the megatron-core internals that megatron_ext.optimizer_fixes patches still look
the way the fixes expect, and another megatron-core is refused by name. (That the fixes work
is tests/test_pretrain_resume.py's distributed-optimizer resume on another layout.)"""

from __future__ import annotations

import inspect
import tomllib
from pathlib import Path

import pytest
from megatron.core import package_info
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

from megatron_ext import cpu_compat, optimizer_fixes


def test_fixed_version_is_the_pinned_one():
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    pin = f"megatron-core=={optimizer_fixes.FIXED_VERSION}"
    assert pin in pyproject["project"]["dependencies"]
    assert package_info.__version__ == optimizer_fixes.FIXED_VERSION == cpu_compat.PINNED_VERSION


def test_other_version_is_refused(monkeypatch):
    monkeypatch.setattr(package_info, "__version__", "0.99.0")
    with pytest.raises(optimizer_fixes.OptimizerFixesError, match="0.16.1.*found 0.99.0"):
        optimizer_fixes._check_version()


def test_patched_internals_unchanged():
    # Bug 2's fix wraps this method and reads the index map it reads.
    method = DistributedOptimizer._set_main_param_and_optimizer_states
    assert list(inspect.signature(method).parameters) == ["self", "model_param", "tensors"]
    assert "model_param_group_index_map[model_param]" in inspect.getsource(method)
    # Bug 1's fix calls the state initialiser megatron keeps on the optimizer.
    assert "self.init_state_fn = init_state_fn" in inspect.getsource(MegatronOptimizer.__init__)
    # Bugs 2 and 3: the loaders drop "step" from the tensors they copy.
    loader = inspect.getsource(DistributedOptimizer.load_parameter_state_from_fully_reshardable)
    assert 'if k == "step":' in loader
