"""A language model's vocabulary head and its losses a chunk of positions at a time.

The head of a decoder LM maps each position's last hidden state to that position's logits alone
(final norms, the vocabulary projection, soft-capping). At 128k-262k-token vocabularies its logits
``[B, T, V]`` (and their gradient, and the dense model's for a distillation) are most of a learning
step's memory. :class:`TokenHead` computes :func:`~nmperm_plugin.arch.base.next_token_cross_entropy`
and :func:`~nmperm_plugin.arch.base.kl_distillation` of the head's output from the hidden states
instead, ``V``-wide logits for a few hundred positions at a time: the same loss and gradient (up to
the order of float sums), never the whole logits.

Each chunk's gradient with respect to its hidden states is taken while the chunk's logits exist (in
the forward pass of :class:`_ChunkedSum`), so backward recomputes nothing: a step costs the head's
forward and backward once, as the whole-logits path does. The head's own parameters get no gradient
(the learner freezes every weight of the model; only the permuters' cost matrices learn).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

# logits per chunk: 64 Mi (256 MiB in float32, as much again for their gradient), 523 positions of a
# 128k vocabulary; enough rows that the projection stays compute-bound on a GPU
LOGITS_PER_CHUNK = 2**26
IGNORE_INDEX = -100  # labels that do not count (F.cross_entropy's default)

Term = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (hidden rows, their other rows) -> summed loss


class _ChunkedSum(torch.autograd.Function):
    """``sum(term(rows[c], other[c]) for chunks c)``, each chunk's gradient with respect to its rows
    taken at once and kept (``[n, D]``, the size of ``rows``); backward scales it."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, other: torch.Tensor, term: Term, size: int) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=rows.device)
        grads = torch.empty_like(rows)
        for start in range(0, len(rows), size):
            with torch.enable_grad():  # forward runs without autograd; this chunk's graph is local
                piece = rows[start : start + size].detach().requires_grad_()
                value = term(piece, other[start : start + size])
                grads[start : start + size] = torch.autograd.grad(value, piece)[0]
            total += value.detach().float()
        ctx.save_for_backward(grads)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (grads,) = ctx.saved_tensors
        return grads * grad.to(grads.dtype), None, None, None


def chunked_sum(rows: torch.Tensor, other: torch.Tensor, term: Term, size: int) -> torch.Tensor:
    """``term`` summed over chunks of ``size`` rows of ``rows`` ``[n, D]`` and ``other`` ``[n, ...]``,
    differentiable in ``rows`` when it requires a gradient, without keeping any chunk's graph."""
    if torch.is_grad_enabled() and rows.requires_grad:
        return _ChunkedSum.apply(rows, other, term, size)
    with torch.no_grad():
        return sum((term(rows[s : s + size], other[s : s + size]).float() for s in range(0, len(rows), size)),
                   torch.zeros((), device=rows.device))  # fmt: skip


class TokenHead:
    """A head that maps every position alone (``[..., D]`` -> ``[..., V]``, ``vocab`` = V), with the
    task term and the distillation of its output computed ``logits_per_chunk // vocab`` positions at
    a time (:func:`chunked_sum`)."""

    def __init__(
        self, head: Callable[[torch.Tensor], torch.Tensor], vocab: int, logits_per_chunk: int = LOGITS_PER_CHUNK
    ) -> None:
        self.head, self.vocab = head, vocab
        self.positions = max(1, logits_per_chunk // vocab)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden)

    def task(self, hidden: torch.Tensor, labels: torch.Tensor | None, dense: torch.Tensor) -> torch.Tensor:
        """The task term of the hidden states ``[B, T, D]``: :meth:`cross_entropy` on ``labels``, or
        without labels :meth:`kl_distillation` from the dense model's last hidden states ``dense``."""
        return self.kl_distillation(hidden, dense) if labels is None else self.cross_entropy(hidden, labels)

    def cross_entropy(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``next_token_cross_entropy(head(hidden), labels)``: hidden ``[B, T, D]``, labels ``[B, T]``
        (``-100`` ignored), each position against the next token."""
        rows, targets = hidden[:, :-1].flatten(0, 1), labels[:, 1:].flatten()

        def term(piece: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(self.head(piece).float(), target, ignore_index=IGNORE_INDEX, reduction="sum")

        return chunked_sum(rows, targets, term, self.positions) / (targets != IGNORE_INDEX).sum()

    def kl_distillation(self, hidden: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """``kl_distillation(head(hidden), head(dense))``: the KL divergence of the pruned model's
        next-token distribution from the dense model's (``dense``: its last hidden states, no
        gradient), averaged over positions."""
        rows, dense_rows = hidden.flatten(0, -2), dense.flatten(0, -2)

        def term(piece: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                log_q = F.log_softmax(self.head(reference).float(), -1)
            log_p = F.log_softmax(self.head(piece).float(), -1)
            return F.kl_div(log_p, log_q, log_target=True, reduction="sum")

        return chunked_sum(rows, dense_rows, term, self.positions) / len(rows)
