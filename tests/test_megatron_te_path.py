"""The Transformer Engine / FP8 path of the parallel model, as far as it can be checked without
TE or a GPU: which linears are selected, how the mapping recognises TE linears, and a canary
on the megatron-core 0.16.1 source the TE path relies on. The canary reads source text only:
``megatron.core.extensions.transformer_engine`` is never imported for its TE classes here."""

from __future__ import annotations

import ast
import contextlib
import importlib.util
from pathlib import Path

import pytest
from megatron.core import fp8_utils
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from torch import nn

from e2d2.config import ModelConfig
from megatron_ext import layout
from megatron_ext.layout import FP8_FORMATS, FP8_RECIPES, ParallelConfig
from megatron_ext.mapping import _tp_axis
from megatron_ext.model import fp8_context, linear_classes, transformer_config

CFG = ModelConfig(variant="e2d2", num_layers=2, num_decoder_layers=1,
                  num_attention_heads=4, num_query_groups=2)


def test_local_implementation_selects_megatron_local_linears():
    column, row = linear_classes(transformer_config(CFG, ParallelConfig(world_size=1)))
    assert issubclass(column, ColumnParallelLinear) and issubclass(row, RowParallelLinear)
    assert isinstance(fp8_context(transformer_config(CFG, ParallelConfig(world_size=1))),
                      contextlib.nullcontext)


@pytest.mark.skipif(layout.transformer_engine_available(), reason="TE is importable here")
def test_this_machine_has_no_transformer_engine():
    # The TE path below is only checked by the canary; the equivalence suite runs the local one.
    assert ParallelConfig(world_size=1).transformer_impl == "local"


def test_mapping_recognises_transformer_engine_linears(monkeypatch):
    """mapping uses megatron's is_column/row_parallel_linear, which know TE's classes when TE
    is importable; stand-ins for those classes get the TE split axes."""

    class TEColumn(nn.Module):
        pass

    class TERow(nn.Module):
        pass

    monkeypatch.setattr(fp8_utils, "HAVE_TE", True)
    monkeypatch.setattr(fp8_utils, "TEColumnParallelLinear", TEColumn, raising=False)
    monkeypatch.setattr(fp8_utils, "TELayerNormColumnParallelLinear", TEColumn, raising=False)
    monkeypatch.setattr(fp8_utils, "TERowParallelLinear", TERow, raising=False)
    assert _tp_axis(TEColumn()) == 0 and _tp_axis(TERow()) == 1 and _tp_axis(nn.Linear(1, 1)) is None


# -- canary: the megatron-core source the TE path is written against -----------------------

def _module_ast(name: str) -> ast.Module:
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.origin, f"{name} moved"
    return ast.parse(Path(spec.origin).read_text())


def _def(tree: ast.AST, name: str) -> ast.AST:
    found = [n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef))
             and n.name == name]
    assert found, f"{name} is gone"
    return found[0]


def _arg_names(fn: ast.FunctionDef) -> set[str]:
    return {a.arg for a in fn.args.args + fn.args.kwonlyargs}


def _method(cls: ast.ClassDef, name: str) -> ast.FunctionDef:
    for node in cls.body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node
    raise AssertionError(f"{cls.name}.{name} is gone")


def test_canary_te_linears():
    tree = _module_ast("megatron.core.extensions.transformer_engine")
    column = _def(tree, "TEColumnParallelLinear")
    row = _def(tree, "TERowParallelLinear")
    linear = _def(tree, "TELinear")
    assert [ast.unparse(b) for b in column.bases] == ["TELinear"]
    assert [ast.unparse(b) for b in row.bases] == ["TELinear"]
    # The keyword arguments megatron_ext.model._ColumnOutput/_RowOutput pass.
    assert {"config", "init_method", "bias", "gather_output", "skip_bias_add",
            "is_expert"} <= _arg_names(_method(column, "__init__"))
    assert {"config", "init_method", "bias", "input_is_parallel", "skip_bias_add",
            "is_expert"} <= _arg_names(_method(row, "__init__"))
    # forward(x) -> (out, None) without bias, like the local linears.
    forward = _method(linear, "forward")
    assert [a.arg for a in forward.args.args] == ["self", "x"]
    assert "return (out, None)" in ast.unparse(forward)
    # The CPU-initialised weights the TE linears build (our weights are loaded afterwards).
    assert "extra_transformer_engine_kwargs['device'] = 'cpu'" in ast.unparse(
        _def(tree, "_get_extra_te_kwargs"))
    # The shape-relevant parallel modes: weight [out / TP, in] and [out, in / TP].
    assert "parallel_mode='column'" in ast.unparse(_method(column, "__init__"))
    assert "parallel_mode='row'" in ast.unparse(_method(row, "__init__"))


def test_canary_fp8_utils():
    tree = _module_ast("megatron.core.fp8_utils")
    contexts = [n for n in ast.walk(tree)
                if isinstance(n, ast.FunctionDef) and n.name == "get_fp8_context"]
    assert len(contexts) == 2  # the TE one and the no-TE nullcontext fallback
    for fn in contexts:
        assert [a.arg for a in fn.args.args] == ["config", "layer_no", "is_init"]
    assert "transformer_engine.pytorch.fp8_autocast" in ast.unparse(contexts[0])
    assert "isinstance(module, TEColumnParallelLinear)" in ast.unparse(
        _def(tree, "is_column_parallel_linear"))
    assert "isinstance(module, TERowParallelLinear)" in ast.unparse(
        _def(tree, "is_row_parallel_linear"))


def test_canary_transformer_config_fields():
    cls = _def(_module_ast("megatron.core.transformer.transformer_config"), "TransformerConfig")
    fields = {n.target.id: ast.unparse(n.annotation) for n in cls.body
              if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
    for recipe in FP8_RECIPES:
        assert repr(recipe) in fields["fp8_recipe"], recipe
    for fmt in FP8_FORMATS:
        assert repr(fmt) in fields["fp8"], fmt
    assert "'local'" in fields["transformer_impl"]
    assert "'transformer_engine'" in fields["transformer_impl"]
    for name in ("fp8_margin", "fp8_amax_history_len", "fp8_amax_compute_algo", "fp8_wgrad"):
        assert name in fields, name
