"""Differentiable matching: log-domain Sinkhorn, Hungarian hardening, straight-through permutations.

Convention: ``P[i, j] = 1`` moves channel ``i`` to position ``j``, so ``W @ P == W[:, perm]`` with
``perm[j] = i``.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import cache

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

MIN_BLOCKS_PER_THREAD = 32  # below this a thread's start costs more than its share of the solves


def log_sinkhorn(log_alpha: torch.Tensor, iters: int) -> torch.Tensor:
    """Alternate row and column log-normalisation of ``[..., B, B]``; returns a log doubly-stochastic matrix."""
    for _ in range(iters):
        log_alpha = log_alpha - log_alpha.logsumexp(dim=-1, keepdim=True)
        log_alpha = log_alpha - log_alpha.logsumexp(dim=-2, keepdim=True)
    return log_alpha


def hungarian(soft: torch.Tensor) -> torch.Tensor:
    """Hard permutations ``perm`` (``[..., B]``) maximising ``sum_j soft[perm[j], j]`` for each matrix.

    SciPy's solver releases the GIL, so many matrices are solved in chunks on up to
    ``torch.get_num_threads()`` threads (the result does not depend on how many)."""
    mats = soft.detach().float().reshape(-1, *soft.shape[-2:]).nan_to_num(nan=0.0).cpu().numpy()
    perms = np.empty(mats.shape[:2], dtype=np.int64)
    threads = min(torch.get_num_threads(), len(mats) // MIN_BLOCKS_PER_THREAD)
    if threads > 1:
        chunks = np.array_split(np.arange(len(mats)), threads)
        list(_pool(threads).map(lambda ks: _solve(mats, perms, ks), chunks))
    else:
        _solve(mats, perms, range(len(mats)))
    return torch.from_numpy(perms).reshape(soft.shape[:-1]).to(soft.device)


def _solve(mats: np.ndarray, perms: np.ndarray, indices) -> None:
    """Fill ``perms[k]`` with the maximising assignment of ``mats[k]`` for each ``k`` in ``indices``."""
    for k in indices:
        rows, cols = linear_sum_assignment(mats[k], maximize=True)
        perms[k, cols] = rows


@cache
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="nmperm-hungarian")


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
