"""Workarounds for three megatron-core 0.16.1 bugs in loading a ``DistributedOptimizer``
checkpoint where megatron's Adam is torch's (no Apex or Transformer Engine: CPU, and some
GPU installs). Unlike ``megatron_ext.cpu_compat`` they apply on GPUs too, so they check
the version themselves; ``tests/test_megatron_optimizer_fixes.py`` is their canary, and
``tests/test_pretrain_resume.py`` resumes a distributed optimizer on another layout
through them.

1. ``state_dict()`` asserts that every parameter state has one common ``step``; a fresh
   optimizer has no state, so ``sharded_state_dict(is_loading=True)`` fails at once.
2. ``load_state_dict`` sets each state's ``step`` from the saved param groups, then
   ``load_parameter_state_from_{fully_reshardable,fs_model_space}`` drops ``step`` from the
   loaded tensors and ``_set_main_param_and_optimizer_states`` copies every state key:
   KeyError 'step'.
3. That ``step`` is one tensor object shared by every parameter state, which torch's Adam
   then increments in place once per parameter: the bias correction goes wrong from the
   first step after the load, differently on each rank.

``prepare_for_load`` (before ``sharded_state_dict(is_loading=True)``) mends 1 and 2,
``after_load`` (after ``load_state_dict``) mends 3.
"""

from __future__ import annotations

import torch

# The megatron-core whose internals these fixes patch (the version pyproject pins).
FIXED_VERSION = "0.16.1"


class OptimizerFixesError(RuntimeError):
    """The installed megatron-core is not the version these fixes were written for."""


def _distributed_optimizers(optimizer) -> list:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return [opt for opt in getattr(optimizer, "chained_optimizers", [optimizer])
            if isinstance(opt, DistributedOptimizer)]


def _check_version() -> None:
    from megatron.core import package_info

    if package_info.__version__ != FIXED_VERSION:
        raise OptimizerFixesError(
            f"megatron_ext.optimizer_fixes patches megatron-core {FIXED_VERSION}'s distributed "
            f"optimizer, found {package_info.__version__}; pin megatron-core=={FIXED_VERSION}, "
            "or check whether the three bugs in this module's docstring remain and update it")


def prepare_for_load(optimizer) -> None:
    """Bugs 1 and 2: give each fresh DistributedOptimizer the state megatron's own
    ``init_state_fn`` creates (zero moments) and step 0, which the load overwrites, and
    make it copy only what was loaded."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    distributed = _distributed_optimizers(optimizer)
    if not distributed:
        return
    _check_version()
    _install_step_copy_fix(DistributedOptimizer)
    for opt in distributed:
        if opt.init_state_fn is not None:
            opt.init_state_fn(opt.optimizer, opt.config)
            for state in opt.optimizer.state.values():
                state.setdefault("step", torch.tensor(0.0))


def _install_step_copy_fix(cls) -> None:
    """Bug 2: copy only what was loaded; ``step`` is already set from the param groups."""
    if getattr(cls, "_e2d2_step_copy_fix", False):
        return
    original = cls._set_main_param_and_optimizer_states

    def set_states(self, model_param, tensors):
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        state = self.optimizer.state[main_param]
        step = state.pop("step", None) if "step" not in tensors else None
        try:
            original(self, model_param, tensors)
        finally:
            if step is not None:
                state["step"] = step

    cls._set_main_param_and_optimizer_states = set_states
    cls._e2d2_step_copy_fix = True


def after_load(optimizer) -> None:
    """Bug 3: one ``step`` tensor per parameter state again."""
    for opt in _distributed_optimizers(optimizer):
        for state in opt.optimizer.state.values():
            if "step" in state:
                state["step"] = state["step"].clone()
