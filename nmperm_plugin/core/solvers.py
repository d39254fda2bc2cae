"""Heuristic permutation solvers: identity, sort-and-deal allocation, RIA-style assignment, swap search.

Every solver has the learner's interface: ``solve(scores [rows, C], pattern, rng) -> perm [C]`` where
``scores[:, perm]`` is the order the N:M mask sees. Sites whose linears share a permutation stack their
score rows.
"""

from __future__ import annotations

import time

import torch
from scipy.optimize import linear_sum_assignment

from .nm import NMPattern

_CHUNK_ELEMENTS = 2**22  # bound on temporary tensors (16 MB of float32; 2x faster than 128 MB, bench/learn_speed.py)


def identity(scores: torch.Tensor, pattern: NMPattern, rng: torch.Generator | None = None) -> torch.Tensor:
    return torch.arange(scores.shape[1])


def allocation(scores: torch.Tensor, pattern: NMPattern, rng: torch.Generator | None = None) -> torch.Tensor:
    """Sort channels by total score and deal them out so the top channels land in different groups."""
    channels = scores.shape[1]
    groups = channels // pattern.m
    if groups == 0 or channels % pattern.m:
        raise ValueError(
            f"{channels} channels cannot be split into groups of M={pattern.m} (pattern {pattern}): "
            f"choose a pattern whose M divides {channels}"
        )
    order = scores.sum(0).argsort(descending=True, stable=True)
    rank = torch.arange(channels)
    position = (rank % groups) * pattern.m + rank // groups
    perm = torch.empty_like(order)
    perm[position] = order
    return perm


def _nth_and_topn(values: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The n-th largest and the sum of the n largest along the last dim."""
    top = values.topk(n, dim=-1).values
    return top[..., -1], top.sum(-1)


def _slot_gain(candidates: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """``gain[c, g] = sum_r relu(candidates[r, c] - threshold[r, g])``, in tiles of rows and candidates.

    A tile (``[rows, candidates, groups]``) holds at most ``_CHUNK_ELEMENTS`` values, however many
    rows there are: a site's stacked scores can have 10^5 rows (the exact ``hidden`` site stacks
    five linears of every layer), where a tile of all rows per candidate would not fit any cache.
    One work buffer serves every tile: a fresh 16 MB temporary per tile would fragment the heap
    (glibc serves that size below its mmap threshold), so peak memory would grow with the number of
    tiles (8.6 GB at 4096 x 2048 scores; 0.7 GB with one buffer, bench/results/scaling-cpu2.json).
    """
    rows, count = candidates.shape
    groups = threshold.shape[1]
    tile_candidates = min(count, max(1, _CHUNK_ELEMENTS // max(groups, 1)))
    tile_rows = min(rows, max(1, _CHUNK_ELEMENTS // max(tile_candidates * groups, 1)))
    work = candidates.new_empty(tile_rows, tile_candidates, groups)
    partial = candidates.new_empty(tile_candidates, groups)
    gain = candidates.new_zeros(count, groups)
    for c in range(0, count, tile_candidates):
        width = min(tile_candidates, count - c)
        for r in range(0, rows, tile_rows):
            height = min(tile_rows, rows - r)
            tile = work[:height, :width]
            torch.sub(candidates[r : r + height, c : c + width, None], threshold[r : r + height, None, :], out=tile)
            torch.sum(tile.clamp_min_(0), dim=0, out=partial[:width])
            gain[c : c + width] += partial[:width]
    return gain


def assignment(
    scores: torch.Tensor, pattern: NMPattern, rng: torch.Generator | None = None, rounds: int = 2
) -> torch.Tensor:
    """RIA-style refinement: for each slot of the M-group, re-assign that slot's channels across
    groups by a linear-sum assignment maximising the retained score, starting from :func:`allocation`.

    Adding channel ``c`` to a group whose other channels have n-th largest score ``t`` raises the
    group's retained score by ``relu(s_c - t)`` per row, so the assignment's gain matrix is exact.
    """
    perm = allocation(scores, pattern)
    rows, channels = scores.shape
    groups = channels // pattern.m
    if groups < 2 or pattern.n >= pattern.m:
        return perm
    for _ in range(rounds):
        for slot in range(pattern.m):
            grouped = scores[:, perm].reshape(rows, groups, pattern.m)
            keep = [k for k in range(pattern.m) if k != slot]
            threshold, _ = _nth_and_topn(grouped[:, :, keep], pattern.n)  # [rows, groups]
            gain = _slot_gain(grouped[:, :, slot], threshold)  # [candidate, group]
            cand, group = linear_sum_assignment(gain.numpy(), maximize=True)
            slot_channels = perm.reshape(groups, pattern.m)[:, slot].clone()
            new = perm.reshape(groups, pattern.m).clone()
            new[torch.as_tensor(group), slot] = slot_channels[torch.as_tensor(cand)]
            perm = new.flatten()
    return perm


def _swap_deltas(a: torch.Tensor, b: torch.Tensor, n: int) -> torch.Tensor:
    """Retained-score change of swapping ``a[..., i]`` with ``b[..., j]``: ``[pairs, m, m]``.

    ``a``, ``b``: ``[rows, pairs, m]`` scores of two groups per pair.
    """
    m = a.shape[-1]
    rest = torch.tensor([[k for k in range(m) if k != i] for i in range(m)])  # row i: every slot but i
    a_rest, b_rest = a[..., rest], b[..., rest]  # [rows, pairs, m, m - 1]
    a_nth, a_top = _nth_and_topn(a_rest, n)  # [rows, pairs, m]
    b_nth, b_top = _nth_and_topn(b_rest, n)
    a_new = a_top[..., :, None] + (b[..., None, :] - a_nth[..., :, None]).clamp_min(0)  # [rows, pairs, i, j]
    b_new = b_top[..., None, :] + (a[..., :, None] - b_nth[..., None, :]).clamp_min(0)
    old = a.topk(n, dim=-1).values.sum(-1) + b.topk(n, dim=-1).values.sum(-1)  # [rows, pairs]
    return (a_new + b_new - old[..., None, None]).sum(0)


def swap_search(
    scores: torch.Tensor,
    pattern: NMPattern,
    rng: torch.Generator | None = None,
    iterations: int = 200,
    seconds: float = 2.0,
    patience: int = 20,
) -> torch.Tensor:
    """Apex-style local search from :func:`assignment`: pair groups at random, apply each pair's best
    improving channel swap; stop after ``iterations``, ``seconds`` or ``patience`` idle rounds."""
    perm = assignment(scores, pattern, rng)
    rows, channels = scores.shape
    groups = channels // pattern.m
    if groups < 2:
        return perm
    start, idle = time.monotonic(), 0
    for _ in range(iterations):
        if idle >= patience or time.monotonic() - start > seconds:
            break
        grouped = perm.reshape(groups, pattern.m)
        pairing = torch.randperm(groups, generator=rng)[: groups // 2 * 2].reshape(-1, 2)  # [pairs, 2]
        a = scores[:, grouped[pairing[:, 0]]]  # [rows, pairs, m]
        b = scores[:, grouped[pairing[:, 1]]]
        deltas = _swap_deltas(a, b, pattern.n).reshape(len(pairing), -1)  # [pairs, m*m]
        best, where = deltas.max(dim=1)
        better = best > 1e-6 * scores.abs().mean() * rows
        if not better.any():
            idle += 1
            continue
        idle = 0
        new = grouped.clone()
        for p in better.nonzero().flatten().tolist():
            i, j = divmod(int(where[p]), pattern.m)
            g1, g2 = pairing[p].tolist()
            new[g1, i], new[g2, j] = grouped[g2, j], grouped[g1, i]
        perm = new.flatten()
    return perm


HEURISTICS = {"identity": identity, "allocation": allocation, "ria": assignment, "swap": swap_search}
