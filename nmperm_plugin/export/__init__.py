"""Serving export: N:M-pruned checkpoints to torchao 2:4 sparse kernels (SPEC section 6).

``to_torchao_(model, TorchaoExportConfig(...))`` converts a model in memory; ``export_checkpoint(dir)``
loads a checkpoint written by nmperm first. Both return an :class:`ExportReport` listing every linear
layer as converted, ready (validated and packed, waiting for a CUDA GPU) or left dense with the reason.
"""

from .pack import pack_2to4, roundtrip_exact, unpack_2to4
from .report import CONVERTED, DENSE, READY, ExportReport, LayerResult
from .torchao import TorchaoExportConfig, export_checkpoint, find_linears, to_torchao_
from .validate import BACKENDS, PRECISIONS, ShapeRule, shape_rule, validate_linear

__all__ = [
    "BACKENDS",
    "CONVERTED",
    "DENSE",
    "PRECISIONS",
    "READY",
    "ExportReport",
    "LayerResult",
    "ShapeRule",
    "TorchaoExportConfig",
    "export_checkpoint",
    "find_linears",
    "pack_2to4",
    "roundtrip_exact",
    "shape_rule",
    "to_torchao_",
    "unpack_2to4",
    "validate_linear",
]
