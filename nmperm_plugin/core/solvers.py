"""Heuristic permutation solvers: identity, sort-and-deal allocation, RIA-style assignment, swap search.

Every solver has the learner's interface: ``solve(scores [rows, C], pattern, rng) -> perm [C]`` where
``scores[:, perm]`` is the order the N:M mask sees. Sites whose linears share a permutation stack their
score rows; a site too large to solve exactly (:func:`solve_shape`) is given a weighted sample of
its rows (:func:`stack_rows`), and the assignment solves it in blocks (:func:`assignment`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from scipy.optimize import linear_sum_assignment

from .nm import NMPattern

_CHUNK_ELEMENTS = 2**20  # bound on the gain's work tile (4 MB of float32: 3x faster than 16 MB, bench/start_scaling.py)
# the RIA-style assignment's gain work per slot (rows x groups x groups per assignment); a site above it
# is solved on a weighted row sample in blocks of groups, at about this work (:func:`solve_shape`).
# SmolLM2-135M's sites are all below it; LLaMA-2-7B's mlp_out (4096 x 2752^2) is not (bench/start_scaling.py)
EXACT_WORK = 2**32
BLOCK_GROUPS = 256  # groups per assignment of a site above EXACT_WORK


def solve_shape(rows: int, channels: int, pattern: NMPattern) -> tuple[int, int]:
    """``(rows kept, groups per assignment)`` of the RIA-style assignment of a ``rows x channels``
    site: all rows and all groups while its gain work ``rows x groups^2`` is at most ``EXACT_WORK``
    (exact); beyond, blocks of ``BLOCK_GROUPS`` groups and as many rows as keep the work at
    ``EXACT_WORK`` (at least 512)."""
    groups = channels // pattern.m
    if rows * groups * groups <= EXACT_WORK:
        return rows, groups
    block = min(groups, BLOCK_GROUPS)
    return min(rows, max(512, EXACT_WORK // (groups * block))), block


def stack_rows(
    parts: Sequence[torch.Tensor], pattern: NMPattern, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The rows the solvers see of a site whose linears' scores are ``parts`` (``[rows_i, C]`` each).

    All of them, stacked, when the site is small enough to solve exactly (:func:`solve_shape`); else
    a weighted sample of the rows it keeps, so a 7B model's stacked ``hidden`` site (a million rows)
    is never built. Each part gives rows in proportion to its row count, drawn with probability
    proportional to their score sum and scaled by the inverse: for every permutation the sample's
    retained score (and every column sum) is an unbiased estimate of the whole site's, because a
    row's retained score scales with the row (its N-th largest scores and the threshold together).
    """
    total, channels = sum(p.shape[0] for p in parts), parts[0].shape[1]
    kept, _ = solve_shape(total, channels, pattern)
    if kept >= total:
        return torch.cat([p.float().cpu() for p in parts])
    # floor: the sample never holds more rows than the solver keeps
    return torch.cat([sample_rows(part, max(1, kept * part.shape[0] // total), generator) for part in parts])


def sample_rows(part: torch.Tensor, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``count`` draws of ``part``'s rows with probability proportional to their sum, each row scaled
    by the inverse of its probability and its draws merged (at most ``count`` rows, float32, CPU)."""
    mass = part.float().sum(1, dtype=torch.float64).cpu().clamp_min(1e-30)
    drawn = torch.multinomial(mass / mass.sum(), count, replacement=True, generator=generator)
    rows, draws = drawn.unique(return_counts=True)
    weight = mass.sum() * draws / (count * mass[rows])
    return part[rows.to(part.device)].float().cpu() * weight[:, None].float()


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
    """``gain[c, g] = sum_r relu(candidates[c, r] - threshold[g, r])`` (channel-major: ``[count, rows]``
    and ``[groups, rows]``), in tiles of candidates, groups and rows.

    A tile (``[candidates, groups, rows]``, reduced over its contiguous last dim) holds at most
    ``_CHUNK_ELEMENTS`` values, however many rows there are: a site's stacked scores can have 10^5
    rows, where a tile of all rows per candidate would not fit any cache. One work buffer serves
    every tile: a fresh temporary per tile would fragment the heap (glibc serves that size below its
    mmap threshold), so peak memory would grow with the number of tiles.
    """
    count, rows = candidates.shape
    groups = threshold.shape[0]
    tile_rows = min(rows, 512, _CHUNK_ELEMENTS)
    tile_groups = min(groups, max(1, _CHUNK_ELEMENTS // tile_rows))
    tile_candidates = min(count, max(1, _CHUNK_ELEMENTS // (tile_rows * tile_groups)))
    work = candidates.new_empty(tile_candidates, tile_groups, tile_rows)
    partial = candidates.new_empty(tile_candidates, tile_groups)
    gain = candidates.new_zeros(count, groups)
    for c in range(0, count, tile_candidates):
        width = min(tile_candidates, count - c)
        for g in range(0, groups, tile_groups):
            height = min(tile_groups, groups - g)
            for r in range(0, rows, tile_rows):
                depth = min(tile_rows, rows - r)
                tile = work[:width, :height, :depth]
                torch.sub(
                    candidates[c : c + width, None, r : r + depth],
                    threshold[None, g : g + height, r : r + depth],
                    out=tile,
                )
                torch.sum(tile.clamp_min_(0), dim=-1, out=partial[:width, :height])
                gain[c : c + width, g : g + height] += partial[:width, :height]
    return gain


def assignment(
    scores: torch.Tensor, pattern: NMPattern, rng: torch.Generator | None = None, rounds: int = 2
) -> torch.Tensor:
    """RIA-style refinement: for each slot of the M-group, re-assign that slot's channels across
    groups by a linear-sum assignment maximising the retained score, starting from :func:`allocation`.

    Adding channel ``c`` to a group whose other channels have n-th largest score ``t`` raises the
    group's retained score by ``relu(s_c - t)`` per row, so the assignment's gain matrix is exact.

    A site too large to solve exactly (:func:`solve_shape`) is solved on a row sample
    (:func:`stack_rows`), each slot's channels re-assigned within blocks of ``BLOCK_GROUPS`` groups
    drawn at random anew for every slot (gain work ``rows x groups x block`` instead of
    ``rows x groups^2``), so a channel can reach any group over the rounds.
    """
    perm = allocation(scores, pattern)
    rows, channels = scores.shape
    groups = channels // pattern.m
    if groups < 2 or pattern.n >= pattern.m:
        return perm
    kept, block = solve_shape(rows, channels, pattern)
    if kept < rows:
        scores = stack_rows([scores], pattern, rng)
        rows = scores.shape[0]
    by_channel = scores.T.contiguous()  # [C, rows]: a permutation gathers whole contiguous rows
    for _ in range(rounds):
        for slot in range(pattern.m):
            grouped = by_channel[perm].view(groups, pattern.m, rows)
            keep = [k for k in range(pattern.m) if k != slot]
            threshold = grouped[:, keep].topk(pattern.n, dim=1).values[:, -1]  # [groups, rows]
            candidates = grouped[:, slot]  # [groups, rows]
            order = torch.arange(groups) if block == groups else torch.randperm(groups, generator=rng)
            slot_channels = perm.reshape(groups, pattern.m)[:, slot].clone()
            new = perm.reshape(groups, pattern.m).clone()
            for start in range(0, groups, block):
                members = order[start : start + block]
                gain = _slot_gain(candidates[members], threshold[members])  # [candidate, group]
                cand, group = linear_sum_assignment(gain.numpy(), maximize=True)
                new[members[torch.as_tensor(group)], slot] = slot_channels[members[torch.as_tensor(cand)]]
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
