"""The learnable groupwise permutation of one site (SPEC 2).

The site's ``C`` input channels are first put in a ``base`` order (a heuristic allocation), then
split into blocks of ``block_size`` consecutive positions; each block has a learnable cost matrix
and is permuted within itself. Tied blocks (grouped-query attention) share one matrix.
"""

from __future__ import annotations

import torch
from torch import nn

from .nm import NMPattern, hard_mask, nm_mask, soft_nm_mask_vjp
from .sinkhorn import hungarian, perm_matrix, straight_through


class BlockPermuter(nn.Module):
    """Block-diagonal learnable permutation on top of a fixed ``base`` order.

    ``logits[g]`` (``[B, B]``, the negated cost ``-C_g``) starts at ``init_scale`` on the diagonal
    plus small noise, so the first hard permutation is ``base`` itself.
    """

    def __init__(
        self,
        base: torch.Tensor,
        block_size: int,
        tied_blocks: tuple[int, ...] | None = None,
        init_scale: float = 1.0,
        noise: float = 0.01,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        channels = base.numel()
        if channels % block_size:
            raise ValueError(f"{channels} channels do not split into blocks of {block_size}")
        blocks = channels // block_size
        tied = torch.arange(blocks) if tied_blocks is None else torch.tensor(tied_blocks)
        if tied.numel() != blocks:
            raise ValueError(f"tied_blocks names {tied.numel()} blocks, expected {blocks}")
        free = int(tied.max()) + 1
        init = init_scale * torch.eye(block_size) + noise * torch.randn(
            free, block_size, block_size, generator=generator
        )
        self.logits = nn.Parameter(init)  # [free, B, B]
        self.register_buffer("base", base.clone().long())
        self.register_buffer("tied", tied)
        self.block_size = block_size

    def _full(self, local: torch.Tensor) -> torch.Tensor:
        """Full permutation from per-block local permutations ``[blocks, B]``."""
        offsets = torch.arange(local.shape[0], device=local.device)[:, None] * self.block_size
        return self.base[(offsets + local).flatten()]

    def sample(self, tau: float, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Straight-through matrices ``P`` (``[blocks, B, B]``) and the hard full permutation."""
        return sample_together([self], tau, iters)[0]

    def hard(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The current hard permutation (Hungarian on the logits) as matrices and full permutation."""
        return hard_together([self])[0]

    def expand(self, matrices: torch.Tensor, local: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-free-block matrices ``[free, B, B]`` and local permutations ``[free, B]`` -> every block's
        matrices and the full permutation."""
        return matrices[self.tied], self._full(local[self.tied])

    def effective_weight(
        self,
        weight: torch.Tensor,  # [rows, C], frozen
        scores: torch.Tensor,  # [rows, C], frozen
        matrices: torch.Tensor,  # [blocks, B, B], straight-through (hard forward)
        perm: torch.Tensor,  # [C], the hard permutation ``matrices`` hold
        pattern: NMPattern,
        mask_tau: float,
    ) -> torch.Tensor:
        """``W_eff = ((W P) * M(S P)) P^T``: the pruned weight in the original channel order.

        Computed by :class:`_EffectiveWeight`: gathers forward (``P`` is hard there), and in backward
        the gradient of the block-matrix formula with respect to ``P``, without keeping its graph.
        """
        return _EffectiveWeight.apply(matrices, perm, weight, scores, pattern, mask_tau)


def _together(permuters: list[BlockPermuter], solve) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``solve(logits) -> (matrices, local)`` once on the stacked logits of all ``permuters`` of one block
    size (one device round trip, one batched Hungarian), split back per permuter and expanded."""
    results: list = [None] * len(permuters)
    by_size: dict[int, list[int]] = {}
    for i, permuter in enumerate(permuters):
        by_size.setdefault(permuter.block_size, []).append(i)
    for indices in by_size.values():
        stacked = torch.cat([permuters[i].logits for i in indices])  # [sum of free blocks, B, B]
        sizes = [permuters[i].logits.shape[0] for i in indices]
        matrices, local = solve(stacked)
        for i, m, perm in zip(indices, matrices.split(sizes), local.split(sizes), strict=True):
            results[i] = permuters[i].expand(m, perm)
    return results


def sample_together(permuters: list[BlockPermuter], tau: float, iters: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[p.sample(tau, iters) for p in permuters]``, batched: the same matrices and permutations."""
    return _together(permuters, lambda logits: straight_through(logits, tau, iters))


def hard_together(permuters: list[BlockPermuter]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[p.hard() for p in permuters]``, batched."""

    def solve(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        local = hungarian(logits)
        return perm_matrix(local, logits.dtype), local

    return _together(permuters, solve)


class _EffectiveWeight(torch.autograd.Function):
    """``W_eff = U(X(W) * M(X(S)))`` where ``X(x)_g = x[:, base]_g P_g`` permutes block ``g``,
    ``U(y)_g = y_g P_g^T`` puts it back, and ``M`` is the N:M mask of the permuted scores: hard forward,
    ``N * softmax(X(S) / mask_tau)`` per group backward (straight-through).

    Forward: with ``P`` hard, ``W_eff = W * hard_mask(S, perm)``: no matrix products, nothing saved
    but the inputs. Backward, with ``G = dL/dW_eff`` and everything in the permuted order
    (``x_p = x[:, perm]``, so ``x[:, base]_g = x_p,g P_g^T``), block by block::

        dP_g = P_g (G_p^T (W_p * M) + W_p^T (G_p * M) + S_p^T dS_p)_g

    where ``dS_p`` is the soft mask's backward of ``G_p * W_p``.
    """

    @staticmethod
    def forward(ctx, matrices, perm, weight, scores, pattern, mask_tau):  # noqa: ANN001
        ctx.save_for_backward(matrices, perm, weight, scores)
        ctx.pattern, ctx.mask_tau = pattern, mask_tau
        return weight * hard_mask(scores, perm, pattern)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001
        matrices, perm, weight, scores = ctx.saved_tensors
        grad_p, weight_p, scores_p = (x.index_select(1, perm) for x in (grad, weight, scores))  # [rows, C]
        mask = nm_mask(scores_p, ctx.pattern)
        d_scores = soft_nm_mask_vjp(scores_p, grad_p * weight_p, ctx.pattern, ctx.mask_tau)
        rows, blocks, size = grad.shape[0], *matrices.shape[:2]
        pairs = ((grad_p, weight_p * mask), (weight_p, grad_p * mask), (scores_p, d_scores))
        within = sum(  # [blocks, B, B]: sum over rows of left^T right, block by block
            torch.bmm(left.view(rows, blocks, size).permute(1, 2, 0), right.view(rows, blocks, size).transpose(0, 1))
            for left, right in pairs
        )
        return torch.bmm(matrices.detach(), within), None, None, None, None, None


def block_matrix_effective_weight(
    permuter: BlockPermuter,
    weight: torch.Tensor,
    scores: torch.Tensor,
    matrices: torch.Tensor,
    pattern: NMPattern,
    mask_tau: float,
) -> torch.Tensor:
    """Reference for :meth:`BlockPermuter.effective_weight`: the formula itself, with dense per-block
    matrix products and a straight-through soft mask, differentiated by autograd. Slow and keeps its
    graph; the tests and ``bench/learn_speed.py`` check and time the fast path against it."""
    size = permuter.block_size

    def permute(x: torch.Tensor) -> torch.Tensor:  # x[:, perm], differentiable through the matrices
        blocks = x[:, permuter.base].reshape(x.shape[0], -1, size)
        return torch.einsum("rgb,gbc->rgc", blocks, matrices).reshape(x.shape)

    def unpermute(y: torch.Tensor) -> torch.Tensor:
        blocks = torch.einsum("rgc,gbc->rgb", y.reshape(y.shape[0], -1, size), matrices)
        return torch.zeros_like(y).index_copy(1, permuter.base, blocks.reshape(y.shape))

    permuted_scores = permute(scores)
    groups = permuted_scores.reshape(permuted_scores.shape[0], -1, pattern.m)
    soft = (pattern.n * torch.softmax(groups / mask_tau, dim=-1)).reshape(permuted_scores.shape)
    mask = nm_mask(permuted_scores.detach(), pattern).to(soft.dtype) + soft - soft.detach()
    return unpermute(permute(weight) * mask)
