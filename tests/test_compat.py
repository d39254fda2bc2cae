"""Tests of nmperm_plugin.compat: every private API of another package goes through it, each fails clearly."""

from __future__ import annotations

import ast
import importlib
import re
import sys
from pathlib import Path

import pytest
import torch

from nmperm_plugin import compat

PACKAGE = Path(compat.__file__).resolve().parent
ROOT = PACKAGE.parent
EXTERNAL = {"torch", "torchao", "llmcompressor", "transformers", "compressed_tensors", "F", "nn"}
KNOWN_PRIVATE = {"_overridden", "_is_amx_tile_supported", "_FORCE_CUTLASS", "_DTYPE_SHAPE_CONSTRAINTS"}
# modules of other packages that are internal though their names are not private (llm-compressor's)
DOCUMENTED = {"_exit"}  # os._exit: public and documented despite its underscore
INTERNAL_MODULES = ("llmcompressor.transformers.compression", "llmcompressor.modifiers.pruning.sparsegpt.sgpt_base")


def own_names() -> set[str]:
    """Every name the package defines (functions, classes, assigned names and attributes, arguments):
    a private attribute that is none of these is another package's."""
    names = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Name | ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.id if isinstance(node, ast.Name) else node.attr)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
    return names


def _root_name(node: ast.AST) -> str | None:
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def private_uses(path: Path, own: set[str] = frozenset()) -> list[str]:
    """Private names of other packages used by the code (not the docstrings) of one module: private
    module paths and imported names, private attributes of other packages' objects (rooted at their
    module, or any private attribute not in ``own``, the package's own names), llm-compressor's
    internal modules."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module != "__future__":
            parts = node.module.split(".")
            names = [alias.name for alias in node.names]
            internal = node.module.startswith(INTERNAL_MODULES)
            private = any(p.startswith("_") for p in parts) or any(
                n.startswith("_") and parts[0] in EXTERNAL for n in names
            )
            if internal or private:
                found.append(f"{path.name}:{node.lineno}: from {node.module} import {', '.join(names)}")
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            foreign = node.attr not in own and node.attr not in DOCUMENTED
            if _root_name(node) in EXTERNAL or node.attr in KNOWN_PRIVATE or foreign:
                found.append(f"{path.name}:{node.lineno}: .{node.attr}")
        elif isinstance(node, ast.Constant) and node.value in KNOWN_PRIVATE:
            found.append(f"{path.name}:{node.lineno}: {node.value!r}")
    return found


def test_no_private_api_outside_compat():
    own = own_names()
    modules = [path for path in sorted(PACKAGE.rglob("*.py")) if path.name != "compat.py"]
    uses = [use for path in modules for use in private_uses(path, own)]
    assert uses == [], "private APIs of other packages belong in nmperm_plugin/compat.py:\n" + "\n".join(uses)


def test_the_detector_sees_the_uses_it_guards_against(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import torch\nfrom torch.sparse._semi_structured_conversions import x\n"
        "torch.sparse.SparseSemiStructuredTensor._FORCE_CUTLASS = True\ngetattr(torch.cpu, '_is_amx_tile_supported')\n"
        "f._overridden = True\n"
    )
    assert len(private_uses(probe)) == 4
    probe.write_text(
        "import argparse\nparser._defaults.clear()\nisinstance(a, argparse._SubParsersAction)\n"
        "m._parameters\nself._mine\n"
        "from llmcompressor.transformers.compression.compressed_tensors_utils import modify_save_pretrained\n"
    )
    assert len(private_uses(probe, own={"_mine"})) == 4


def test_compat_imports_nothing_from_nmperm_plugin():
    tree = ast.parse((PACKAGE / "compat.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0 and not (node.module or "").startswith("nmperm_plugin"), ast.dump(node)
        if isinstance(node, ast.Import):
            assert not any(alias.name.startswith("nmperm_plugin") for alias in node.names)


# --- versions ---------------------------------------------------------------------------------------------


def test_version_tuple_and_torchao_range():
    assert compat.version_tuple("2.13.0+cpu") == (2, 13, 0)
    assert compat.version_tuple("0.19.0.dev20260901") == (0, 19, 0)
    with pytest.raises(ValueError, match="release number"):
        compat.version_tuple("main")
    assert compat.torchao_supported("0.18.0") and compat.torchao_supported("0.18.1")
    assert not compat.torchao_supported("0.17.0") and not compat.torchao_supported("0.19.0")


def test_pyproject_pins_torchao_to_the_compat_range_and_the_installed_version_is_in_it():
    text = (ROOT / "pyproject.toml").read_text()
    pins = re.findall(r'"(torchao[^"]*)"', text)
    assert pins == [compat.TORCHAO_REQUIREMENT]
    assert "<" in compat.TORCHAO_REQUIREMENT  # an upper bound until the next release is tried
    assert compat.torchao_supported(compat.installed_version("torchao"))


# --- torch ------------------------------------------------------------------------------------------------
def test_pyproject_pins_torch_to_the_compat_range_and_the_installed_version_is_in_it():
    text = (ROOT / "pyproject.toml").read_text()
    assert re.findall(r'"(torch[<>=][^"]*)"', text) == [compat.TORCH_REQUIREMENT]
    low, high = re.fullmatch(r"torch>=([\d.]+),<([\d.]+)", compat.TORCH_REQUIREMENT).groups()
    installed = compat.version_tuple(torch.__version__.split("+")[0])
    assert compat.version_tuple(low) <= installed < compat.version_tuple(high)


def test_semi_structured_names_resolve_to_torchs_own():
    from_dense, to_dense = compat.semi_structured_conversions()
    assert callable(from_dense) and callable(to_dense)
    expected = torch.sparse.SparseSemiStructuredTensorCUSPARSELT._DTYPE_SHAPE_CONSTRAINTS[torch.bfloat16]
    assert compat.semi_structured_tile("cusparselt", torch.bfloat16) == tuple(expected)
    assert compat.semi_structured_tile("cutlass", torch.float16).sparse_min_cols == 64
    with pytest.raises(ValueError, match="unknown 2:4 backend"):
        compat.semi_structured_tile("triton", torch.bfloat16)


def test_force_cutlass_sets_and_restores_even_on_error():
    cls = torch.sparse.SparseSemiStructuredTensor
    before = cls._FORCE_CUTLASS
    with pytest.raises(KeyError), compat.force_cutlass(not before):
        assert cls._FORCE_CUTLASS is (not before)
        raise KeyError("boom")
    assert cls._FORCE_CUTLASS is before


def test_vanished_torch_names_raise_an_error_naming_the_versions(monkeypatch):
    monkeypatch.delattr(torch.sparse.SparseSemiStructuredTensor, "_FORCE_CUTLASS")
    with pytest.raises(compat.PrivateAPIMissing, match=r"_FORCE_CUTLASS is missing from torch 2\.\d+.*checked against"):
        with compat.force_cutlass(True):
            pass
    monkeypatch.setitem(sys.modules, "torch.sparse._semi_structured_conversions", None)
    with pytest.raises(compat.PrivateAPIMissing, match="_semi_structured_conversions is missing"):
        compat.semi_structured_conversions()
    monkeypatch.delattr(torch.sparse.SparseSemiStructuredTensorCUTLASS, "_DTYPE_SHAPE_CONSTRAINTS")
    with pytest.raises(compat.PrivateAPIMissing, match="_DTYPE_SHAPE_CONSTRAINTS"):
        compat.semi_structured_tile("cutlass", torch.bfloat16)
    monkeypatch.delattr(torch, "_cslt_compress")
    with pytest.raises(compat.PrivateAPIMissing, match="torch._cslt_compress is missing"):
        compat.cslt_compress(torch.zeros(16, 16))


def test_tensor_version_counts_in_place_changes_and_names_torch_when_gone():
    x = torch.zeros(3)
    before = compat.tensor_version(x)
    x.add_(1)
    assert compat.tensor_version(x) == before + 1 and compat.tensor_version(x + 1) == 0
    with pytest.raises(compat.PrivateAPIMissing, match=r"torch.Tensor._version is missing from torch 2\.\d+"):
        compat.tensor_version(object())


def test_amx_probe_answers_false_with_a_warning_when_torch_drops_it(monkeypatch):
    assert isinstance(compat.amx_tile_supported(), bool)
    messages = []
    sink = compat.logger.add(messages.append, level="WARNING")
    compat._warn_once.cache_clear()
    try:
        monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
        assert compat.amx_tile_supported() is False
    finally:
        compat.logger.remove(sink)
        compat._warn_once.cache_clear()
    assert any("_is_amx_tile_supported is missing" in str(message) for message in messages)


# --- llm-compressor ---------------------------------------------------------------------------------------


def test_save_pretrained_flag_is_copied():
    def source():
        pass

    def target():
        pass

    source._overridden = True
    compat.copy_save_pretrained_flag(source, target)
    assert target._overridden is True and compat.save_pretrained_overridden(target)
    del source._overridden
    compat.copy_save_pretrained_flag(source, target)
    assert target._overridden is False


def test_llmcompressor_still_marks_save_pretrained_with_the_flag():
    """The convention compat copies: llm-compressor's modify_save_pretrained sets ``_overridden`` and checks it."""
    import llmcompressor.transformers.compression.compressed_tensors_utils as utils  # a hard dependency
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    model = LlamaForCausalLM(config)
    assert not compat.save_pretrained_overridden(model.save_pretrained)
    utils.modify_save_pretrained(model)
    assert compat.save_pretrained_overridden(model.save_pretrained), (
        f"llmcompressor {compat.installed_version('llmcompressor')} no longer sets save_pretrained."
        f"{compat.SAVE_OVERRIDDEN_ATTR}: update compat.copy_save_pretrained_flag"
    )


# --- torchao ----------------------------------------------------------------------------------------------


def test_torchao_fp8_configs_are_the_ones_the_export_needs():
    from torchao.quantization import PerRow
    from torchao.quantization.quantize_.workflows import Float8PackingFormat, Float8Sparse2x4_2DData2DMetadataTensor

    sparse = compat.torchao_fp8_config(sparse=True)
    assert sparse.packing_format == Float8PackingFormat.SPARSE_2D_DATA_2D_METADATA
    assert all(isinstance(g, PerRow) for g in sparse.granularity)
    assert compat.torchao_fp8_config(sparse=False).packing_format == Float8PackingFormat.PLAIN
    assert Float8Sparse2x4_2DData2DMetadataTensor in compat.torchao_fp8_sparse_types()


def test_missing_torchao_api_names_the_installed_version_and_the_range(monkeypatch):
    workflows = importlib.import_module("torchao.quantization.quantize_.workflows")

    class Plain(str):
        PLAIN = "plain"

    monkeypatch.setattr(workflows, "Float8PackingFormat", Plain)
    with pytest.raises(compat.PrivateAPIMissing) as error:
        compat.torchao_fp8_config(sparse=True)
    text = str(error.value)
    assert f"torchao {compat.installed_version('torchao')}" in text and ">=0.18,<0.19" in text
    assert "pip install 'torchao>=0.18,<0.19'" in text
    monkeypatch.setitem(sys.modules, "torchao", None)
    with pytest.raises(compat.PrivateAPIMissing, match="supports torchao >=0.18,<0.19"):
        compat.require_torchao("FP8 2:4")


def test_torchao_outside_the_range_warns_once(monkeypatch):
    messages = []
    sink = compat.logger.add(messages.append, level="WARNING")
    compat._warn_once.cache_clear()
    monkeypatch.setattr(compat, "installed_version", lambda name: "0.19.0")
    try:
        compat.require_torchao("FP8 2:4")
        compat.require_torchao("FP8 2:4")
    finally:
        compat.logger.remove(sink)
        compat._warn_once.cache_clear()
    assert sum("torchao 0.19.0 is outside the range" in str(message) for message in messages) == 1
