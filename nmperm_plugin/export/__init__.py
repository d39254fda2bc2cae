"""Serving export: N:M-pruned checkpoints to 2:4 sparse kernels (SPEC section 6).

``to_torchao_(model, TorchaoExportConfig(...))`` converts a model in memory; ``export_checkpoint(dir)``
loads a checkpoint written by nmperm first. Both return an :class:`ExportReport` listing every linear
layer as converted, ready (validated and packed, waiting for a CUDA GPU) or left dense with the reason.

``sparsify_(model, SemiSparseWeightConfig())`` / ``sparsify_(model, Float8SemiSparseWeightConfig())`` is the
torchao-style call (torchao's own ``torchao.sparsity`` is gone from its main branch); ``serve(model,
ServeConfig(...))`` prepares a converted model for serving (cuSPARSELt algorithm per shape, CUDA graphs).
"""

from .cusparselt import CusparseltLinear, ServeError, prepare_linears_
from .directory import export_checkpoint
from .pack import pack_2to4, roundtrip_exact, unpack_2to4
from .report import CONVERTED, DENSE, READY, ExportReport, LayerResult
from .serving import GraphRunner, ServeConfig, ServedModel, check_served, parse_shape, serve
from .sparsify import (
    Float8SemiSparseWeightConfig,
    SemiSparseWeightConfig,
    SparsifyConfig,
    SparsifyError,
    handler_for,
    register_sparsify_handler,
    sparsify_,
)
from .torchao import TorchaoExportConfig, find_linears, to_torchao_
from .validate import BACKENDS, PRECISIONS, ShapeRule, shape_rule, validate_linear

__all__ = [
    "BACKENDS",
    "CONVERTED",
    "DENSE",
    "PRECISIONS",
    "READY",
    "CusparseltLinear",
    "ExportReport",
    "Float8SemiSparseWeightConfig",
    "GraphRunner",
    "LayerResult",
    "SemiSparseWeightConfig",
    "ServeConfig",
    "ServeError",
    "ServedModel",
    "ShapeRule",
    "SparsifyConfig",
    "SparsifyError",
    "TorchaoExportConfig",
    "check_served",
    "export_checkpoint",
    "find_linears",
    "handler_for",
    "pack_2to4",
    "parse_shape",
    "prepare_linears_",
    "register_sparsify_handler",
    "roundtrip_exact",
    "serve",
    "shape_rule",
    "sparsify_",
    "to_torchao_",
    "unpack_2to4",
    "validate_linear",
]
