"""Every use of another package's private API, and of version-sensitive torchao names, in one place.

Each function below wraps one private (underscore) name of torch or llm-compressor, or one torchao name
that has moved between releases, says which version it was checked against, and raises a
:class:`PrivateAPIMissing` naming the installed version and what to do when the name is gone. Nothing
else in ``nmperm_plugin`` touches another package's private API; this module imports nothing from
``nmperm_plugin`` (it is the bottom layer).

Wrapped names (package, version checked against, user):

- ``torch.sparse._semi_structured_conversions``, the CUTLASS 2:4 pack/unpack in Python (torch 2.13.0, 2.11.0;
  export.pack);
- ``SparseSemiStructuredTensorCUSPARSELT/CUTLASS._DTYPE_SHAPE_CONSTRAINTS`` (torch 2.13.0, 2.11.0; export.validate,
  export.sparsify, export.serving);
- ``SparseSemiStructuredTensor._FORCE_CUTLASS`` (torch 2.13.0, 2.11.0; export.sparsify);
- ``torch._cslt_compress``, ``torch._cslt_sparse_mm``, ``torch._cslt_sparse_mm_search`` (torch 2.13.0 op schemas;
  export.serving);
- ``torch.cpu._is_amx_tile_supported`` (torch 2.13.0; objectives);
- the ``save_pretrained._overridden`` flag llm-compressor's ``modify_save_pretrained`` sets and checks
  (llmcompressor 0.14.0.1; compress);
- llm-compressor's internal modules: ``modify_save_pretrained``
  (``llmcompressor.transformers.compression.compressed_tensors_utils``) and ``SparsityModifierBase``
  (``llmcompressor.modifiers.pruning.sparsegpt.sgpt_base``) (llmcompressor 0.14.0.1; compress);
- ``nn.Module._parameters``, where llm-compressor's offloading puts its ``OffloadCache`` (torch 2.13.0,
  compressed-tensors 0.19; runtime.onload);
- ``torch.Tensor._version``, the in-place counter (torch 2.13.0; learn.layers);
- argparse's ``_SubParsersAction``, ``_HelpAction``, ``ArgumentParser._actions`` and ``_defaults``
  (Python 3.10-3.13; cli, export.cli);
- torchao's FP8 2:4 names, ``Float8PackingFormat.SPARSE_2D_DATA_2D_METADATA`` (``SPARSE_CUTLASS``) and the
  FP8 2:4 tensor class (torchao 0.18.0; export.sparsify, export.torchao).

torchao is supported in :data:`TORCHAO_REQUIREMENT` (the range in ``pyproject.toml``): the FP8 2:4 path was
run with 0.18.0 only. torchao 0.14 has no FP8 2:4 packing format at all; 0.16/0.17 name it
``Float8PackingFormat.SPARSE_CUTLASS`` with the tensor class ``Sparse2x4CUTLASSFloat8Tensor`` (read from
their wheels, not run), which the lookups below also accept. Outside the range a warning is logged once;
a missing name is an error naming the installed version and the supported range.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.metadata
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from loguru import logger

TORCH_CHECKED = "2.13.0 (CPU) and 2.11.0+cu130 (H200)"
LLMCOMPRESSOR_CHECKED = "0.14.0.1"
TORCHAO_CHECKED = "0.18.0"
TORCHAO_MIN = (0, 18)  # inclusive
TORCHAO_BELOW = (0, 19)  # exclusive: the next release has not been tried (and drops torchao.sparsity)
TORCHAO_REQUIREMENT = "torchao>=0.18,<0.19"
SAVE_OVERRIDDEN_ATTR = "_overridden"  # llmcompressor: compressed_tensors_utils.modify_save_pretrained


class CompatError(RuntimeError):
    """Another package's API that nmperm_plugin relies on is missing or unusable in the installed version."""


class PrivateAPIMissing(CompatError):
    """A private (or moved) name of another package is gone from the installed version."""


def installed_version(distribution: str) -> str | None:
    """The installed version of ``distribution`` (``"torch"``, ``"torchao"``), or None if not installed."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def version_tuple(version: str) -> tuple[int, ...]:
    """The leading numeric release of a version string: ``"2.13.0+cpu"`` -> ``(2, 13, 0)``."""
    match = re.match(r"\d+(\.\d+)*", version.strip())
    if match is None:
        raise ValueError(f"cannot read a release number from version {version!r}")
    return tuple(int(part) for part in match.group(0).split("."))


def missing(api: str, package: str, checked: str, remedy: str) -> PrivateAPIMissing:
    """The error for a vanished ``api`` of ``package``: names it, the installed and checked versions, a remedy."""
    found = installed_version(package) or "(not installed)"
    return PrivateAPIMissing(
        f"{api} is missing from {package} {found}; nmperm_plugin uses it and was checked against "
        f"{package} {checked}. {remedy}"
    )


def _torch_attr(owner: Any, name: str, api: str, remedy: str) -> Any:
    try:
        return getattr(owner, name)
    except AttributeError:
        raise missing(api, "torch", TORCH_CHECKED, remedy) from None


# --- torch: semi-structured (2:4) sparsity -----------------------------------------------------------------

TORCH_REQUIREMENT = "torch>=2.11,<2.14"  # the range in pyproject.toml (a test keeps them equal)
PIN_TORCH = f"Install a torch version in the range pyproject.toml pins ({TORCH_REQUIREMENT})."


def semi_structured_conversions() -> tuple[Callable, Callable]:
    """``(sparse_semi_structured_from_dense_cutlass, sparse_semi_structured_to_dense_cutlass)`` from
    ``torch.sparse._semi_structured_conversions``: the pure-Python 2:4 pack/unpack (CUTLASS layout), any device."""
    api = "torch.sparse._semi_structured_conversions"
    try:
        module = importlib.import_module(api)
    except ImportError:
        raise missing(api, "torch", TORCH_CHECKED, PIN_TORCH) from None
    names = ("sparse_semi_structured_from_dense_cutlass", "sparse_semi_structured_to_dense_cutlass")
    return tuple(_torch_attr(module, name, f"{api}.{name}", PIN_TORCH) for name in names)


class SemiStructuredTile(NamedTuple):
    """torch's minimums for a 2:4 matmul: the sparse operand (weight) and the dense operand (activations)."""

    sparse_min_rows: int
    sparse_min_cols: int
    dense_min_rows: int
    dense_min_cols: int


SEMI_STRUCTURED_CLASSES = {
    "cusparselt": "SparseSemiStructuredTensorCUSPARSELT",
    "cutlass": "SparseSemiStructuredTensorCUTLASS",
}


def semi_structured_tile(backend: str, dtype: torch.dtype) -> SemiStructuredTile:
    """torch's ``_DTYPE_SHAPE_CONSTRAINTS`` of ``backend`` (``"cusparselt"``/``"cutlass"``) for ``dtype``
    (falling back to the bfloat16 entry for dtypes torch does not list)."""
    if backend not in SEMI_STRUCTURED_CLASSES:
        raise ValueError(f"unknown 2:4 backend {backend!r}: choose one of {', '.join(SEMI_STRUCTURED_CLASSES)}")
    name = SEMI_STRUCTURED_CLASSES[backend]
    cls = _torch_attr(torch.sparse, name, f"torch.sparse.{name}", PIN_TORCH)
    api = f"torch.sparse.{name}._DTYPE_SHAPE_CONSTRAINTS"
    constraints = _torch_attr(cls, "_DTYPE_SHAPE_CONSTRAINTS", api, PIN_TORCH)
    entry = constraints.get(dtype, constraints.get(torch.bfloat16))
    try:
        return SemiStructuredTile(
            int(entry.sparse_min_rows), int(entry.sparse_min_cols), int(entry.dense_min_rows), int(entry.dense_min_cols)
        )
    except AttributeError:
        fields = f"{api} fields sparse_min_rows/cols, dense_min_rows/cols"
        raise missing(fields, "torch", TORCH_CHECKED, PIN_TORCH) from None


@contextmanager
def force_cutlass(enabled: bool) -> Iterator[None]:
    """Make ``torch.sparse.to_sparse_semi_structured`` pick CUTLASS (True) or cuSPARSELt (False) inside the block,
    through ``SparseSemiStructuredTensor._FORCE_CUTLASS``; the previous value is restored afterwards."""
    cls = torch.sparse.SparseSemiStructuredTensor
    if not hasattr(cls, "_FORCE_CUTLASS"):
        raise missing("torch.sparse.SparseSemiStructuredTensor._FORCE_CUTLASS", "torch", TORCH_CHECKED, PIN_TORCH)
    previous = cls._FORCE_CUTLASS
    cls._FORCE_CUTLASS = enabled
    try:
        yield
    finally:
        cls._FORCE_CUTLASS = previous


# --- torch: cuSPARSELt ops (CUDA builds) -------------------------------------------------------------------

CSLT_REMEDY = (
    "The serving path calls cuSPARSELt directly; without it use serve(..., tune='off') on a SparseSemiStructuredTensor "
    "model, or a torch version in the pinned range."
)


def _cslt(name: str) -> Callable:
    return _torch_attr(torch, name, f"torch.{name}", CSLT_REMEDY)


def cslt_compress(weight: torch.Tensor) -> torch.Tensor:
    """``torch._cslt_compress``: a 2:4 CUDA weight ``[out, in]`` to cuSPARSELt's compressed form (opaque)."""
    return _cslt("_cslt_compress")(weight)


def cslt_sparse_mm(
    packed: torch.Tensor,
    dense: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    transpose_result: bool = False,
    alg_id: int = 0,
) -> torch.Tensor:
    """``torch._cslt_sparse_mm(packed, dense)``: ``W [m, k] @ dense [k, n]`` -> ``[m, n]``, or ``[n, m]`` with
    ``transpose_result`` (the fused transpose a linear layer wants), using cuSPARSELt algorithm ``alg_id``."""
    return _cslt("_cslt_sparse_mm")(packed, dense, bias=bias, transpose_result=transpose_result, alg_id=alg_id)


def cslt_search(
    packed: torch.Tensor, dense: torch.Tensor, *, bias: torch.Tensor | None = None, transpose_result: bool = False
) -> int:
    """``torch._cslt_sparse_mm_search``: cuSPARSELt's own pick of the fastest algorithm id for this problem."""
    return int(_cslt("_cslt_sparse_mm_search")(packed, dense, bias=bias, transpose_result=transpose_result))


def cusparselt_max_alg_id() -> int | None:
    """The largest cuSPARSELt algorithm id torch knows for the linked library (None: unknown or no cuSPARSELt)."""
    getter = getattr(torch.backends.cusparselt, "get_max_alg_id", None)
    return None if getter is None else getter()


# --- torch: CPU features ------------------------------------------------------------------------------------


@functools.cache
def _warn_once(message: str) -> None:
    logger.warning(message)


def amx_tile_supported() -> bool:
    """``torch.cpu._is_amx_tile_supported()``: whether this CPU has AMX tiles (fast bfloat16 matmuls).

    A capability probe, so when torch drops the name this logs one warning naming the checked version and
    answers False (callers then keep float32, the safe choice) instead of failing the run.
    """
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    if probe is None:
        _warn_once(
            f"torch.cpu._is_amx_tile_supported is missing from torch {torch.__version__} (checked against "
            f"{TORCH_CHECKED}): assuming no AMX, so 'auto' training dtype stays float32 on CPU"
        )
        return False
    return bool(probe())


# --- llm-compressor ---------------------------------------------------------------------------------------


def save_pretrained_overridden(save: Callable) -> bool:
    """Whether ``save`` carries llm-compressor's ``_overridden`` flag (``modify_save_pretrained`` has wrapped it)."""
    return bool(getattr(save, SAVE_OVERRIDDEN_ATTR, False))


def copy_save_pretrained_flag(source: Callable, target: Callable) -> None:
    """Give a wrapper ``target`` of ``source`` the same llm-compressor ``_overridden`` flag, so llm-compressor's
    ``modify_save_pretrained`` (which checks ``getattr(model.save_pretrained, "_overridden", False)``, checked
    against llmcompressor 0.14.0.1) neither wraps it twice nor loses its compression step."""
    version = installed_version("llmcompressor")
    if version is not None and version != LLMCOMPRESSOR_CHECKED:
        _warn_once(
            f"llmcompressor {version}: the save_pretrained `{SAVE_OVERRIDDEN_ATTR}` flag convention was checked "
            f"against {LLMCOMPRESSOR_CHECKED} only (tests/test_compat.py verifies it for the installed version)"
        )
    setattr(target, SAVE_OVERRIDDEN_ATTR, save_pretrained_overridden(source))


# --- torchao (FP8 2:4) -------------------------------------------------------------------------------------


def torchao_range_text() -> str:
    """The supported torchao range as text, e.g. ``">=0.18,<0.19"``."""
    return TORCHAO_REQUIREMENT.removeprefix("torchao")


def torchao_supported(version: str) -> bool:
    """Whether ``version`` lies in the tested range :data:`TORCHAO_REQUIREMENT`."""
    release = version_tuple(version)[:2]
    return TORCHAO_MIN <= release < TORCHAO_BELOW


def torchao_missing(api: str) -> PrivateAPIMissing:
    """The error for a torchao name that is gone: installed version, supported range, what to do."""
    found = installed_version("torchao") or "(not installed)"
    return PrivateAPIMissing(
        f"{api} is not available in torchao {found}; nmperm_plugin's FP8 2:4 path supports torchao "
        f"{torchao_range_text()} (tested with {TORCHAO_CHECKED}). Install a supported version: "
        f"pip install '{TORCHAO_REQUIREMENT}'"
    )


def require_torchao(api: str) -> Any:
    """Import torchao for ``api`` (a description), warning once when its version is outside the tested range."""
    try:
        torchao = importlib.import_module("torchao")
    except ImportError:
        raise torchao_missing(api) from None
    version = installed_version("torchao") or getattr(torchao, "__version__", "0")
    if not torchao_supported(version):
        _warn_once(
            f"torchao {version} is outside the range nmperm_plugin was tested with ({torchao_range_text()}); "
            f"{api} may not work"
        )
    return torchao


def _torchao_names(module: str, *names: str, api: str) -> tuple[Any, ...]:
    try:
        loaded = importlib.import_module(module)
        return tuple(getattr(loaded, name) for name in names)
    except (ImportError, AttributeError):
        raise torchao_missing(api) from None


def torchao_fp8_config(sparse: bool) -> Any:
    """torchao's ``Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), packing_format=...)``:
    dynamic per-row e4m3 activations, per-row e4m3 weights; ``sparse`` selects the 2:4 CUTLASS packing
    (``SPARSE_2D_DATA_2D_METADATA`` in 0.18, named ``SPARSE_CUTLASS`` in 0.16-0.17), else the plain one."""
    api = "Float8DynamicActivationFloat8WeightConfig with a 2:4 packing format" if sparse else "FP8 dense"
    require_torchao(api)
    config_cls, per_row = _torchao_names(
        "torchao.quantization", "Float8DynamicActivationFloat8WeightConfig", "PerRow", api=api
    )
    (formats,) = _torchao_names("torchao.quantization.quantize_.workflows", "Float8PackingFormat", api=api)
    if not sparse:
        return config_cls(granularity=per_row())
    packing = getattr(formats, "SPARSE_2D_DATA_2D_METADATA", None) or getattr(formats, "SPARSE_CUTLASS", None)
    if packing is None:
        raise torchao_missing("Float8PackingFormat.SPARSE_2D_DATA_2D_METADATA (or SPARSE_CUTLASS)")
    return config_cls(granularity=per_row(), packing_format=packing)


def torchao_fp8_sparse_types() -> tuple[type, ...]:
    """The torchao tensor classes an FP8 2:4 weight becomes (0.18: ``Float8Sparse2x4_2DData2DMetadataTensor``,
    with ``Sparse2x4CUTLASSFloat8Tensor`` as its alias; 0.16-0.17: ``Sparse2x4CUTLASSFloat8Tensor``)."""
    require_torchao("the FP8 2:4 tensor class")
    module = importlib.import_module("torchao.quantization.quantize_.workflows")
    names = ("Float8Sparse2x4_2DData2DMetadataTensor", "Sparse2x4CUTLASSFloat8Tensor")
    found = tuple({getattr(module, name) for name in names if hasattr(module, name)})
    if not found:
        raise torchao_missing("the FP8 2:4 tensor class (Float8Sparse2x4_2DData2DMetadataTensor)")
    return found


def torchao_quantize_(model: torch.nn.Module, config: Any, filter_fn: Callable[[torch.nn.Module, str], bool]) -> None:
    """``torchao.quantization.quantize_(model, config, filter_fn=filter_fn)`` (in place)."""
    (quantize,) = _torchao_names("torchao.quantization", "quantize_", api="torchao.quantization.quantize_")
    quantize(model, config, filter_fn=filter_fn)


# -- llm-compressor's internal modules (llmcompressor 0.14.0.1) -----------------------------------------
def modify_save_pretrained() -> Callable:
    """llm-compressor's ``modify_save_pretrained`` (wraps ``save_pretrained`` to compress on save)."""
    module = "llmcompressor.transformers.compression.compressed_tensors_utils"
    return _import_name(module, "modify_save_pretrained", "llmcompressor", "0.14.0.1")


def sparsity_modifier_base() -> type:
    """llm-compressor's base of the pruning modifiers that compute masks (SparseGPT, Wanda)."""
    module = "llmcompressor.modifiers.pruning.sparsegpt.sgpt_base"
    return _import_name(module, "SparsityModifierBase", "llmcompressor", "0.14.0.1")


def _import_name(module: str, name: str, package: str, checked: str) -> Any:
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        raise missing(f"{module}.{name}", package, checked, f"install {package}=={checked}") from None


# -- torch.nn.Module internals (torch 2.13.0) -------------------------------------------------------------
def parameter_store(module: torch.nn.Module) -> Any:
    """``module._parameters``: the mapping a module keeps its own parameters in (llm-compressor's
    offloading replaces it with an ``OffloadCache``)."""
    return module._parameters


def tensor_version(tensor: torch.Tensor) -> int:
    """``tensor._version``: the counter every in-place operation on the tensor increments (torch 2.13.0),
    how learn.layers tells an input changed in place from the one a linear saw before."""
    return _torch_attr(tensor, "_version", "torch.Tensor._version", PIN_TORCH)


# -- argparse internals (Python 3.10-3.13) ----------------------------------------------------------------
SubParsers = argparse._SubParsersAction  # what ArgumentParser.add_subparsers returns


def parser_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """Every action (option, positional, sub-parser set) of ``parser``."""
    return parser._actions


def clear_parser_defaults(parser: argparse.ArgumentParser) -> None:
    """Forget the defaults ``parser.set_defaults`` recorded."""
    parser._defaults.clear()


def is_subparsers(action: argparse.Action) -> bool:
    return isinstance(action, argparse._SubParsersAction)


def is_help(action: argparse.Action) -> bool:
    return isinstance(action, argparse._HelpAction)
