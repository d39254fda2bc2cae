"""The compressed 2:4 representation on any device, via PyTorch's pure-Python semi-structured conversions.

``torch.sparse._semi_structured_conversions`` (through :mod:`nmperm_plugin.compat`) turns a 2:4 fp16/bf16
matrix into the CUTLASS layout (kept values ``[rows, cols / 2]`` plus reordered int16 metadata) and back,
without CUDA. It needs ``rows % 32 == 0`` and, although it only checks ``cols % 16``, ``cols % 32 == 0`` (its metadata
reordering interleaves pairs of metadata columns and fails on an odd count). Other shapes are padded
with zero rows/columns (zeros keep every group 2:4) and cropped after unpacking. cuSPARSELt's own compressed format is
produced by the cuSPARSELt library on the GPU; the values and mask it encodes are the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..compat import semi_structured_conversions

PACK_DTYPES = (torch.float16, torch.bfloat16)
PACK_ROW_MULTIPLE = 32
PACK_COL_MULTIPLE = 32  # 16 per metadata element, and the metadata reordering interleaves column pairs


def _padding(size: int, multiple: int) -> int:
    return (-size) % multiple


def pack_2to4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Compress a 2:4 fp16/bf16 ``[rows, cols]`` weight into (kept values, metadata), CUTLASS layout.

    The weight is zero-padded to ``rows % 32 == 0`` and ``cols % 32 == 0`` first, so the outputs have
    the padded shape (values ``[rows', cols' / 2]``). A weight that is not 2:4 packs without error but
    loses values, which :func:`roundtrip_exact` detects.
    """
    if weight.dim() != 2:
        raise ValueError(f"pack_2to4 needs a 2-D weight, got shape {tuple(weight.shape)}")
    if weight.dtype not in PACK_DTYPES:
        raise ValueError(f"pack_2to4 packs float16/bfloat16 weights, got {weight.dtype}: cast with --dtype bf16")
    if weight.shape[1] % 4:
        raise ValueError(f"pack_2to4 needs in_features divisible by 4, got {weight.shape[1]}")
    rows, cols = weight.shape
    padded = F.pad(weight.detach(), (0, _padding(cols, PACK_COL_MULTIPLE), 0, _padding(rows, PACK_ROW_MULTIPLE)))
    from_dense, _ = semi_structured_conversions()
    return from_dense(padded.contiguous())


def unpack_2to4(values: torch.Tensor, meta: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Rebuild the dense ``shape`` weight from :func:`pack_2to4`'s (values, metadata)."""
    _, to_dense = semi_structured_conversions()
    dense = to_dense(values, meta)
    return dense[: shape[0], : shape[1]]


@torch.no_grad()
def roundtrip_exact(weight: torch.Tensor) -> bool:
    """True when packing ``weight`` to 2:4 and unpacking it gives back exactly the same values."""
    values, meta = pack_2to4(weight)
    return torch.equal(unpack_2to4(values, meta, tuple(weight.shape)), weight.detach())
