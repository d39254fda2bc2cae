"""N:M sparsity along the input dimension: patterns, masks, retained score and its bound.

A weight ``W`` is ``[out, in]``; N:M keeps N of every M consecutive input columns in each row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class NMPattern:
    """An N:M pattern (keep ``n`` of every ``m`` consecutive weights along the input dim)."""

    n: int
    m: int

    def __post_init__(self) -> None:
        if not (0 < self.n < self.m):
            raise ValueError(f"invalid N:M pattern {self.n}:{self.m}: need 0 < N < M (keep N of every M), e.g. 2:4")

    @classmethod
    def parse(cls, text: str | NMPattern) -> NMPattern:
        """Parse ``"2:4"``; raise ``ValueError`` naming the bad text otherwise."""
        if isinstance(text, NMPattern):
            return text
        parts = str(text).strip().split(":")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"invalid N:M pattern {text!r}: write it as 'N:M' with integers, e.g. '2:4' or '4:8'")
        return cls(int(parts[0]), int(parts[1]))

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"

    @property
    def density(self) -> float:
        return self.n / self.m

    def check_dim(self, dim: int, what: str) -> None:
        """Raise ``ValueError`` if ``dim`` input channels cannot be split into groups of M."""
        if dim % self.m:
            raise ValueError(
                f"{what} has {dim} input channels, not divisible by M={self.m} of pattern {self}; "
                f"choose an M that divides {dim} or exclude this layer"
            )


def _groups(x: torch.Tensor, m: int) -> torch.Tensor:
    """``[..., in]`` -> ``[..., in / m, m]``."""
    return x.reshape(*x.shape[:-1], x.shape[-1] // m, m)


def nm_mask(scores: torch.Tensor, pattern: NMPattern) -> torch.Tensor:
    """Boolean mask keeping the top-N scores of every M consecutive entries of the last dim."""
    groups = _groups(scores, pattern.m)
    keep = groups.topk(pattern.n, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.reshape(scores.shape)


def soft_nm_mask(scores: torch.Tensor, pattern: NMPattern, tau: float) -> torch.Tensor:
    """Hard N:M mask forward, ``N * softmax(scores / tau)`` per group backward (straight-through)."""
    hard = nm_mask(scores.detach(), pattern).to(scores.dtype)
    soft = (pattern.n * torch.softmax(_groups(scores, pattern.m) / tau, dim=-1)).reshape(scores.shape)
    return hard + soft - soft.detach()


def retained_score(scores: torch.Tensor, pattern: NMPattern) -> torch.Tensor:
    """Sum of the scores an N:M mask keeps (scalar)."""
    return _groups(scores, pattern.m).topk(pattern.n, dim=-1).values.sum()


def unstructured_bound(scores: torch.Tensor, pattern: NMPattern) -> torch.Tensor:
    """Sum of the scores a per-row unstructured mask of the same density keeps; no permutation beats it."""
    k = scores.shape[-1] * pattern.n // pattern.m
    return scores.topk(k, dim=-1).values.sum()


def nm_violations(weight: torch.Tensor, pattern: NMPattern) -> int:
    """Number of M-groups holding more than N non-zeros (0 means the weight is N:M)."""
    nonzero = _groups(weight != 0, pattern.m).sum(dim=-1)
    return int((nonzero > pattern.n).sum())


def is_nm(weight: torch.Tensor, pattern: NMPattern) -> bool:
    """True when every M-group of every row has at most N non-zeros."""
    return weight.shape[-1] % pattern.m == 0 and nm_violations(weight, pattern) == 0
