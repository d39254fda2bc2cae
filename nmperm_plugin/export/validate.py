"""Which linear layers a 2:4 backend can take: pattern, dtype and shape rules, checked on any device.

Shape rules for the fp16/bf16 backends are read from torch itself (through :mod:`nmperm_plugin.compat`:
``torch.sparse.SparseSemiStructuredTensorCUSPARSELT`` / ``...CUTLASS``, ``_DTYPE_SHAPE_CONSTRAINTS``;
the weight's rows (``out_features``) and columns (``in_features``) must each be at least, and a multiple
of, the backend's minimum). The FP8 2:4 rule is torchao's: ``_fp8_mm_compat`` leaves a weight dense
unless both dimensions are multiples of 16, and the CUTLASS kernel
(``rowwise_scaled_linear_sparse_cutlass``) needs ``in_features % 32 == 0``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..compat import semi_structured_tile
from ..core.nm import NMPattern, is_nm, nm_violations
from .report import DENSE, READY, LayerResult

BACKENDS = ("cusparselt", "cutlass")
PRECISIONS = ("bf16", "fp16", "fp8")
TWO_FOUR = NMPattern(2, 4)
SEMI_SPARSE_DTYPES = (torch.float16, torch.bfloat16)
BACKEND_LABELS = {"cusparselt": "cuSPARSELt", "cutlass": "CUTLASS", "fp8": "FP8 2:4 CUTLASS"}
FP8_MIN_ROWS = 16  # torchao.quantization.utils._fp8_mm_compat: out_features % 16
FP8_MIN_COLS = 32  # rowwise_scaled_linear_sparse_cutlass: activation columns (in_features) % 32


@dataclass(frozen=True)
class ShapeRule:
    """A backend's tile minimums for a weight ``[out_features, in_features]``: each dim >= and a multiple."""

    min_rows: int
    min_cols: int
    label: str

    def violations(self, out_features: int, in_features: int) -> list[str]:
        """Human-readable reasons the shape fails this rule (empty when it passes)."""
        reasons = []
        checks = (("out_features", out_features, self.min_rows), ("in_features", in_features, self.min_cols))
        for what, size, minimum in checks:
            if size < minimum or size % minimum:
                reasons.append(f"{what} {size} not a multiple of {minimum} required by {self.label}")
        return reasons


def torch_dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def shape_rule(backend: str, precision: str, dtype: torch.dtype) -> ShapeRule:
    """The shape minimums of ``backend`` for weights of ``dtype`` (``precision="fp8"``: the FP8 2:4 rule)."""
    if precision == "fp8":
        return ShapeRule(FP8_MIN_ROWS, FP8_MIN_COLS, BACKEND_LABELS["fp8"])
    if backend not in BACKENDS:
        raise ValueError(f"unknown 2:4 backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    tile = semi_structured_tile(backend, dtype)
    return ShapeRule(tile.sparse_min_rows, tile.sparse_min_cols, BACKEND_LABELS[backend])


def pattern_reasons(weight: torch.Tensor, declared: NMPattern | None, gather_hint: bool) -> list[str]:
    """Why ``weight`` is not 2:4 as stored (empty when every group of 4 holds at most 2 non-zeros)."""
    in_features = weight.shape[-1]
    if in_features % TWO_FOUR.m:
        return [f"in_features {in_features} not a multiple of 4, so not 2:4"]
    if is_nm(weight, TWO_FOUR):
        return []
    if declared is not None and declared != TWO_FOUR:
        return [f"pattern is {declared}, backend needs exactly 2:4"]
    reason = f"not 2:4 as stored: {nm_violations(weight, TWO_FOUR)} groups of 4 hold more than 2 non-zeros"
    if gather_hint:
        reason += " (fold: gather checkpoint: apply learn.fold.apply_gather first; export_checkpoint does)"
    return [reason]


def dtype_reasons(dtype: torch.dtype) -> list[str]:
    """Why ``dtype`` cannot go to a 2:4 fp16/bf16 (or FP8-from-bf16) kernel (empty when it can)."""
    if dtype in SEMI_SPARSE_DTYPES:
        return []
    return [f"dtype {torch_dtype_name(dtype)}: convert with --dtype bf16"]


def declared_nm_ok(weight: torch.Tensor, declared: NMPattern | None, pruned: bool | None) -> bool | None:
    """Whether a layer the sidecar lists as pruned is N:M under its declared pattern (None: not declared)."""
    if not pruned or declared is None:
        return None
    return is_nm(weight, declared)


def validate_linear(
    name: str,
    weight: torch.Tensor,
    *,
    backend: str,
    precision: str,
    declared: NMPattern | None = None,
    pruned: bool | None = None,
    gather_hint: bool = False,
) -> LayerResult:
    """Check one linear weight against ``backend``'s pattern, dtype and shape requirements.

    Returns a :class:`LayerResult` with status ``ready`` when the layer can be converted, otherwise
    ``dense`` with every reason that applies. ``pruned=False`` (the sidecar does not list the layer)
    leaves it dense without further checks.
    """
    out_features, in_features = weight.shape
    result = LayerResult(
        name=name,
        out_features=out_features,
        in_features=in_features,
        dtype=torch_dtype_name(weight.dtype),
        status=DENSE,
        pruned=pruned,
        nm_ok=declared_nm_ok(weight, declared, pruned),
    )
    if pruned is False:
        result.reason = "not pruned (not listed in the sidecar)"
        return result
    reasons = pattern_reasons(weight, declared, gather_hint) + dtype_reasons(weight.dtype)
    reasons += shape_rule(backend, precision, weight.dtype).violations(out_features, in_features)
    if reasons:
        result.reason = "; ".join(reasons)
    else:
        result.status = READY
    return result
