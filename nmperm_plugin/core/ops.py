"""Tensor operations on modules: reorder a layer's input columns or output rows, run-time gathers.

The bottom layer of the package: adapters build their exact and gather folds from these.
"""

from __future__ import annotations

import torch
from torch import nn


class GatherNorm(nn.Module):
    """A norm whose output channels are gathered: ``norm(x)[..., perm]``.

    The RMS (or mean/variance) statistic is order-independent, so this is the fused form of a
    per-layer input permutation for the linears the norm feeds.
    """

    def __init__(self, norm: nn.Module, perm: torch.Tensor) -> None:
        super().__init__()
        self.norm = norm
        self.register_buffer("perm", perm.clone().long())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x).index_select(-1, self.perm)


class GatherLinear(nn.Module):
    """``linear(x[..., perm])`` with the real ``nn.Linear`` as child ``.linear``."""

    def __init__(self, linear: nn.Linear, perm: torch.Tensor) -> None:
        super().__init__()
        self.linear = linear
        self.register_buffer("perm", perm.clone().long())

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.index_select(-1, self.perm))


@torch.no_grad()
def permute_inputs_(linear: nn.Module, perm: torch.Tensor) -> None:
    """Reorder a linear's input columns: ``W <- W[:, perm]``."""
    linear.weight.data = linear.weight.data[:, perm.to(linear.weight.device)].contiguous()


@torch.no_grad()
def permute_outputs_(module: nn.Module, perm: torch.Tensor) -> None:
    """Reorder a linear's output rows (and bias), or a norm's weight: ``W <- W[perm]``."""
    perm = perm.to(module.weight.device)
    module.weight.data = module.weight.data[perm].contiguous()
    if getattr(module, "bias", None) is not None:
        module.bias.data = module.bias.data[perm].contiguous()


@torch.no_grad()
def permute_embedding_(embedding: nn.Embedding, perm: torch.Tensor) -> None:
    """Reorder embedding channels: ``E <- E[:, perm]``."""
    permute_inputs_(embedding, perm)


@torch.no_grad()
def permute_channels_(parameter: nn.Parameter, perm: torch.Tensor) -> None:
    """Reorder a parameter's last dimension (a class token ``[1, 1, D]``, position embeddings
    ``[1, T, D]``, a ``[D]`` vector): ``p <- p[..., perm]``."""
    parameter.data = parameter.data[..., perm.to(parameter.device)].contiguous()


def tied_head_perm(tied_heads: tuple[int, ...], head_perms: torch.Tensor) -> torch.Tensor:
    """Full input permutation of heads laid side by side, head ``h`` permuted within itself by
    ``head_perms[tied_heads[h]]`` (``head_perms``: ``[groups, head_size]``)."""
    size = head_perms.shape[1]
    offsets = torch.arange(len(tied_heads)).mul(size)[:, None]  # [heads, 1]
    return (offsets + head_perms[list(tied_heads)]).flatten()


# the largest function_error a fold may cause, by dtype: summation order changes rounding, which compounds
# through the layers (tests/test_fold.py measures it); a wrong fold changes logits by their whole scale
FUNCTION_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}


def function_error(reference: torch.Tensor, other: torch.Tensor) -> float:
    """The largest difference between two outputs, relative to the reference's scale
    (``max |a - b| / max(max |a|, 1)``): comparable across models, hosts and precisions."""
    scale = reference.detach().abs().max().clamp_min(1.0)
    return float((other.detach().float() - reference.detach().float()).abs().max() / scale)


def function_tolerance(dtype: torch.dtype) -> float:
    """The :func:`function_error` a float-exact transformation (a fold) stays under in ``dtype``."""
    return FUNCTION_TOLERANCE.get(dtype, FUNCTION_TOLERANCE[torch.float32])
