"""Calibration statistics and the built-in mask generators (saliency score per weight)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch


@dataclass
class ChannelStats:
    """Statistics of one linear layer's inputs, accumulated over calibration batches.

    ``sq_norm[j]`` is ``||X_j||_2^2`` (sum over tokens); ``hessian`` is ``X^T X`` when requested.
    """

    sq_norm: torch.Tensor  # [in]
    tokens: int = 0
    hessian: torch.Tensor | None = None  # [in, in]

    @classmethod
    def empty(cls, channels: int, with_hessian: bool = False, device: torch.device | None = None) -> ChannelStats:
        zeros = dict(dtype=torch.float64, device=device)
        hessian = torch.zeros(channels, channels, **zeros) if with_hessian else None
        return cls(torch.zeros(channels, **zeros), 0, hessian)

    def update(self, x: torch.Tensor) -> None:
        """Add a batch of inputs ``x`` (``[..., in]``)."""
        x = x.detach().reshape(-1, x.shape[-1])
        self.sq_norm += x.to(torch.float64).square().sum(0)
        self.tokens += x.shape[0]
        if self.hessian is not None:  # a batch's product in float32 (as llm-compressor's), the sum in float64
            x = x.float()
            self.hessian += (x.T @ x).double()

    def permuted(self, perm: torch.Tensor) -> ChannelStats:
        """The statistics of the same inputs with their channels reordered as ``x[..., perm]``."""
        hessian = None if self.hessian is None else self.hessian[perm][:, perm]
        return ChannelStats(self.sq_norm[perm], self.tokens, hessian)


class NonFiniteError(ValueError):
    """A weight or activation holds NaN or infinite values."""


def check_finite_stats(stats: Mapping[str, ChannelStats]) -> None:
    """Raise :class:`NonFiniteError` naming the first linear whose calibration inputs held NaN or inf
    (``||X_j||^2`` is then not finite; any score built on it would be NaN and the mask meaningless)."""
    for name, stat in stats.items():
        bad = int((~torch.isfinite(stat.sq_norm)).sum())
        if stat.hessian is not None and not bad:
            bad = int((~torch.isfinite(stat.hessian.diagonal())).sum())
        if bad:
            raise NonFiniteError(
                f"calibration activations entering {name} are not finite (NaN or inf in {bad} of "
                f"{stat.sq_norm.numel()} input channels): an earlier layer overflows float32 on this text; check the "
                "dense model with `nmperm eval` (its perplexity is then NaN or inf) and use an intact model"
            )


ScoreFn = Callable[[torch.Tensor, ChannelStats], torch.Tensor]


@dataclass(frozen=True)
class MaskGenerator:
    """A saliency score ``fn(weight [out, in], stats) -> [out, in]``; higher means keep."""

    name: str
    fn: ScoreFn
    needs_hessian: bool = False

    def __call__(self, weight: torch.Tensor, stats: ChannelStats) -> torch.Tensor:
        return self.fn(weight.detach().float(), stats).float()


def magnitude(weight: torch.Tensor, stats: ChannelStats) -> torch.Tensor:
    return weight.abs()


def wanda(weight: torch.Tensor, stats: ChannelStats) -> torch.Tensor:
    return weight.abs() * stats.sq_norm.sqrt().to(weight.dtype)


def ria(weight: torch.Tensor, stats: ChannelStats) -> torch.Tensor:
    a = weight.abs()
    relative = a / a.sum(0, keepdim=True).clamp_min(1e-12) + a / a.sum(1, keepdim=True).clamp_min(1e-12)
    return relative * stats.sq_norm.sqrt().sqrt().to(weight.dtype)


def sparsegpt(weight: torch.Tensor, stats: ChannelStats, damp: float = 0.01) -> torch.Tensor:
    """SparseGPT's OBS saliency ``w^2 / [H^-1]_jj`` with the same 1% dampening."""
    h = stats.hessian.clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(damp * h.diagonal().mean())
    h_inv_diag = torch.cholesky_inverse(torch.linalg.cholesky(h)).diagonal()
    return weight.square() / h_inv_diag.to(weight.dtype)


BUILTIN_GENERATORS = (
    MaskGenerator("magnitude", magnitude),
    MaskGenerator("wanda", wanda),
    MaskGenerator("ria", ria),
    MaskGenerator("sparsegpt", sparsegpt, needs_hessian=True),
)
