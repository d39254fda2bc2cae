"""The kept weights of a linear updated for a mask that is already chosen.

For a mask ``keep`` and the layer's calibration inputs ``X`` (``H = X^T X``), the best kept weights
of each row minimise ``(w - v) H (w - v)^T`` with ``v`` zero where pruned: ``(v H)_K = (w H)_K`` on
the kept set ``K``. SparseGPT (Frantar & Alistarh, 2023) approximates this in one pass, column by
column, with the optimal-brain-surgeon correction ``-err * [H^-1]_{j, j:} / [H^-1]_jj`` of the
columns not yet visited, because it chooses its masks as it goes. With the mask fixed in advance
(the learned permutation's N:M masks) the system can be solved: :func:`reconstruct` starts from
SparseGPT's pass (llm-compressor's ``sparsify_weight`` arithmetic without the mask choice) and
refines it with conjugate gradients on all rows at once, one ``[out, in] x [in, in]`` product per
iteration, converging to the least-squares weights.
"""

from __future__ import annotations

import torch


def inverse_hessian_factor(hessian: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """The upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1`` (float32), with channels
    that never saw an input (``H_jj = 0``) given a unit diagonal, as SparseGPT does."""
    h = hessian.to(torch.float32).clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    h.diagonal().add_(damp * h.diagonal().mean())
    try:
        inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
        return torch.linalg.cholesky(inverse, upper=True)
    except torch.linalg.LinAlgError as error:
        raise ValueError(
            f"the calibration Hessian of a {h.shape[0]}-input linear is not positive definite even with "
            f"{damp:.0%} dampening: raise reconstruct_damp or give more calibration sequences"
        ) from error


def _check_shapes(weight: torch.Tensor, keep: torch.Tensor, hessian: torch.Tensor) -> None:
    if keep.shape != weight.shape or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(
            f"shapes disagree: weight {tuple(weight.shape)}, keep {tuple(keep.shape)}, hessian {tuple(hessian.shape)}"
        )


@torch.no_grad()
def reconstruct(
    weight: torch.Tensor, keep: torch.Tensor, hessian: torch.Tensor, damp: float = 0.01, iterations: int = 20
) -> torch.Tensor:
    """``weight`` (``[out, in]``) pruned to ``keep`` (bool, same shape), its kept weights updated to
    reduce ``||(W - W') X||`` for the inputs whose ``X^T X`` is ``hessian`` (``[in, in]``, dampened
    by ``damp`` times its mean diagonal): SparseGPT's pass (:func:`sparsegpt_update`), then
    ``iterations`` of :func:`refine` (0: SparseGPT's pass alone). Zero where ``keep`` is false;
    returned in ``weight``'s dtype, ``weight`` itself unchanged."""
    updated = sparsegpt_update(weight, keep, hessian, damp)
    if iterations:
        updated = refine(weight, updated, keep, hessian, damp, iterations)
    return updated.to(weight.dtype)


@torch.no_grad()
def refine(
    weight: torch.Tensor,
    start: torch.Tensor,
    keep: torch.Tensor,
    hessian: torch.Tensor,
    damp: float = 0.01,
    iterations: int = 20,
) -> torch.Tensor:
    """``iterations`` of Jacobi-preconditioned conjugate gradients, every row at once, on
    ``(v H)_K = (w H)_K`` (``v`` zero off the kept set ``K``), from ``start``; float32."""
    _check_shapes(weight, keep, hessian)
    h = hessian.to(device=start.device, dtype=torch.float32).clone()
    h.diagonal().add_(damp * h.diagonal().mean())
    kept = keep.to(start.device, torch.float32)
    scale = 1 / h.diagonal().clamp_min(1e-12)
    v = start.to(torch.float32) * kept
    residual = (weight.to(v) @ h - v @ h) * kept
    z = residual * scale
    direction, rz = z, (residual * z).sum(1, keepdim=True)
    for _ in range(iterations):
        product = (direction @ h) * kept
        alpha = rz / (direction * product).sum(1, keepdim=True).clamp_min(1e-30)
        v = v + alpha * direction
        residual = residual - alpha * product
        z = residual * scale
        rz, previous = (residual * z).sum(1, keepdim=True), rz
        direction = z + rz / previous.clamp_min(1e-30) * direction
    return v


@torch.no_grad()
def sparsegpt_update(
    weight: torch.Tensor, keep: torch.Tensor, hessian: torch.Tensor, damp: float = 0.01, block_size: int = 128
) -> torch.Tensor:
    """SparseGPT's one pass for the given mask: float32, zero where ``keep`` is false."""
    _check_shapes(weight, keep, hessian)
    w = weight.to(torch.float32).clone()
    w[:, hessian.diagonal() == 0] = 0  # inputs that are always zero: their weights never mattered
    factor = inverse_hessian_factor(hessian.to(w.device), damp)
    prune = ~keep.to(w.device)
    columns = w.shape[1]
    for start in range(0, columns, block_size):
        stop = min(start + block_size, columns)
        block, inverse = w[:, start:stop].clone(), factor[start:stop, start:stop]
        errors = torch.zeros_like(block)
        for j in range(stop - start):
            column = block[:, j]
            error = torch.where(prune[:, start + j], column, 0) / inverse[j, j]
            block[:, j:] -= error.unsqueeze(1) * inverse[j, j:].unsqueeze(0)
            block[:, j] = torch.where(prune[:, start + j], 0, block[:, j])
            errors[:, j] = error
        w[:, start:stop] = block
        w[:, stop:] -= errors @ factor[start:stop, stop:]
    return w.masked_fill_(prune, 0)
