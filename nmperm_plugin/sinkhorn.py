"""Differentiable matching: log-domain Sinkhorn, Hungarian hardening, straight-through permutations.

Convention: ``P[i, j] = 1`` moves channel ``i`` to position ``j``, so ``W @ P == W[:, perm]`` with
``perm[j] = i``.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


def log_sinkhorn(log_alpha: torch.Tensor, iters: int) -> torch.Tensor:
    """Alternate row and column log-normalisation of ``[..., B, B]``; returns a log doubly-stochastic matrix."""
    for _ in range(iters):
        log_alpha = log_alpha - log_alpha.logsumexp(dim=-1, keepdim=True)
        log_alpha = log_alpha - log_alpha.logsumexp(dim=-2, keepdim=True)
    return log_alpha


def hungarian(soft: torch.Tensor) -> torch.Tensor:
    """Hard permutations ``perm`` (``[..., B]``) maximising ``sum_j soft[perm[j], j]`` for each matrix."""
    mats = soft.detach().float().reshape(-1, *soft.shape[-2:]).nan_to_num(nan=0.0).cpu().numpy()
    perms = np.empty(mats.shape[:2], dtype=np.int64)
    for k, mat in enumerate(mats):
        rows, cols = linear_sum_assignment(mat, maximize=True)
        perms[k, cols] = rows
    return torch.from_numpy(perms).reshape(soft.shape[:-1]).to(soft.device)


def perm_matrix(perm: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One-hot ``P`` (``[..., B, B]``) with ``P[perm[j], j] = 1``."""
    size = perm.shape[-1]
    eye = torch.eye(size, dtype=dtype, device=perm.device)
    return eye[perm].transpose(-1, -2)


def straight_through(log_alpha: torch.Tensor, tau: float, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard permutation matrices forward, Sinkhorn soft ones backward. Returns ``(P, perm)``."""
    soft = log_sinkhorn(log_alpha / tau, iters).exp()
    perm = hungarian(soft)
    hard = perm_matrix(perm, soft.dtype)
    return hard + soft - soft.detach(), perm


def anneal(step: int, total: int, start: float, end: float) -> float:
    """Linear schedule from ``start`` (step 0) to ``end`` (last step)."""
    return start + (end - start) * step / max(total - 1, 1)


def invert(perm: torch.Tensor) -> torch.Tensor:
    """The inverse permutation: ``x[perm][invert(perm)] == x``."""
    return torch.argsort(perm)
