"""The learnable groupwise permutation of one site (SPEC 2).

The site's ``C`` input channels are first put in a ``base`` order (a heuristic allocation), then
split into blocks of ``block_size`` consecutive positions; each block has a learnable cost matrix
and is permuted within itself. Tied blocks (grouped-query attention) share one matrix.
"""

from __future__ import annotations

import torch
from torch import nn

from .nm import NMPattern, soft_nm_mask
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
        matrices, local = straight_through(self.logits, tau, iters)
        return matrices[self.tied], self._full(local[self.tied])

    def hard(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The current hard permutation (Hungarian on the logits) as matrices and full permutation."""
        local = hungarian(self.logits)[self.tied]
        return perm_matrix(local, self.logits.dtype), self._full(local)

    def permute(self, x: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
        """``x[:, perm]`` for ``x`` ``[rows, C]``, differentiable through ``matrices``."""
        blocks = x[:, self.base].reshape(x.shape[0], -1, self.block_size)  # [rows, blocks, B]
        return torch.einsum("rgb,gbc->rgc", blocks, matrices).reshape(x.shape)

    def unpermute(self, y: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`permute`: back to the original channel order."""
        blocks = torch.einsum("rgc,gbc->rgb", y.reshape(y.shape[0], -1, self.block_size), matrices)
        return torch.zeros_like(y).index_copy(1, self.base, blocks.reshape(y.shape))

    def effective_weight(
        self, weight: torch.Tensor, scores: torch.Tensor, matrices: torch.Tensor, pattern: NMPattern, mask_tau: float
    ) -> torch.Tensor:
        """``W_eff = ((W P) * M(S P)) P^T``: the pruned weight in the original channel order."""
        mask = soft_nm_mask(self.permute(scores, matrices), pattern, mask_tau)
        return self.unpermute(self.permute(weight, matrices) * mask, matrices)
