"""N:M sparsity along the input dimension: patterns, masks, retained score and its bound.

A weight ``W`` is ``[out, in]``; N:M keeps N of every M consecutive input columns in each row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sinkhorn import invert


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
                f"choose a pattern whose M divides {dim}"
            )


def _groups(x: torch.Tensor, m: int) -> torch.Tensor:
    """``[..., in]`` -> ``[..., in / m, m]``."""
    return x.reshape(*x.shape[:-1], x.shape[-1] // m, m)


def _planes(x: torch.Tensor, m: int) -> torch.Tensor:
    """``[..., in]`` -> ``[m, ..., in / m]``, contiguous: plane ``k`` holds the k-th entry of every group."""
    return _groups(x, m).movedim(-1, 0).contiguous()


def _descending_rank(planes: torch.Tensor) -> torch.Tensor:
    """Each entry's place in its group's descending order (0: largest); ties go to the earlier entry.

    ``planes`` is ``[m, ...]`` (see :func:`_planes`); so is the result. Pairwise comparisons of
    contiguous planes, which suit small M better than ``topk`` over a last dim of 4 or 8.
    """
    rank = torch.zeros(planes.shape, dtype=torch.uint8, device=planes.device)
    for i, plane in enumerate(planes):
        for j, other in enumerate(planes):
            if j != i:
                rank[i] += other >= plane if j < i else other > plane
    return rank


def nm_mask(scores: torch.Tensor, pattern: NMPattern) -> torch.Tensor:
    """Boolean mask keeping the top-N scores of every M consecutive entries of the last dim
    (ties: the earlier entries)."""
    keep = _descending_rank(_planes(scores, pattern.m)) < pattern.n  # [m, ..., in / m]
    return keep.movedim(0, -1).reshape(scores.shape)


def hard_mask(scores: torch.Tensor, perm: torch.Tensor, pattern: NMPattern) -> torch.Tensor:
    """N:M mask of ``scores`` computed in the permuted order ``scores[:, perm]``, returned in the original order."""
    perm = perm.to(scores.device)
    return nm_mask(scores.index_select(1, perm), pattern).index_select(1, invert(perm))


def soft_nm_mask_vjp(scores: torch.Tensor, upstream: torch.Tensor, pattern: NMPattern, tau: float) -> torch.Tensor:
    """Backward of the soft N:M mask ``N * softmax(scores / tau)`` (per group of M): ``upstream`` times its Jacobian.

    The learner uses the hard mask forward and this gradient backward (straight-through). Computed on
    ``[M, ...]`` planes, where the per-group sums are fast contiguous reductions.
    """
    logits = _planes(scores, pattern.m) / tau  # [m, ..., in / m]
    probs = logits.sub_(logits.amax(0)).exp_()
    probs /= probs.sum(0)
    upstream = _planes(upstream, pattern.m)
    grad = (upstream - (upstream * probs).sum(0)).mul_(probs).mul_(pattern.n / tau)
    return grad.movedim(0, -1).reshape(scores.shape)


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
