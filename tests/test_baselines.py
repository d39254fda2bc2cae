import pytest
import torch

from nmperm_plugin.core import solvers as baselines
from nmperm_plugin.core.nm import NMPattern, retained_score
from nmperm_plugin.core.solvers import HEURISTICS, _slot_gain, allocation, assignment, swap_search


def _ratio(scores, perm, pattern):
    return float(retained_score(scores[:, perm], pattern))


@pytest.mark.parametrize("pattern", [NMPattern(2, 4), NMPattern(4, 8), NMPattern(1, 4)])
@pytest.mark.parametrize("name", list(HEURISTICS))
def test_valid_permutation(name, pattern):
    for scores in (torch.rand(32, 64) * torch.rand(64) ** 2, torch.ones(32, 64), torch.rand(32, 64).round()):
        perm = HEURISTICS[name](scores, pattern, torch.Generator().manual_seed(0))
        assert torch.equal(perm.sort().values, torch.arange(64))


def test_refinements_never_lose_retained_score():
    pattern = NMPattern(2, 4)
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        scores = torch.rand(48, 128, generator=generator) * torch.rand(128, generator=generator) ** 3
        alloc, ria = allocation(scores, pattern), assignment(scores, pattern)
        swap = swap_search(scores, pattern, torch.Generator().manual_seed(1), iterations=50)
        identity = _ratio(scores, torch.arange(128), pattern)
        assert _ratio(scores, alloc, pattern) >= identity * 0.999
        assert _ratio(scores, ria, pattern) >= _ratio(scores, alloc, pattern) - 1e-4
        assert _ratio(scores, swap, pattern) >= _ratio(scores, ria, pattern) - 1e-4


def test_allocation_separates_top_channels():
    scores = torch.zeros(4, 16)
    scores[:, :4] = 10.0  # four dominant channels all in group 0
    perm = allocation(scores, NMPattern(2, 4))
    groups = {int(torch.nonzero(perm == c)) // 4 for c in range(4)}
    assert groups == {0, 1, 2, 3}


# one row, group and candidate a tile; 3 groups a tile (ragged); all groups, 2 candidates (ragged); one tile
@pytest.mark.parametrize("chunk_elements", [1, 7 * 3, 7 * 13 * 2 + 5, 2**22])
def test_slot_gain_is_the_formula_at_any_chunk_size(chunk_elements, monkeypatch):
    generator = torch.Generator().manual_seed(0)
    candidates, threshold = torch.rand(10, 7, generator=generator), torch.rand(13, 7, generator=generator)
    expected = (candidates[:, None, :] - threshold[None, :, :]).clamp_min(0).sum(-1)  # [candidate, group]
    monkeypatch.setattr(baselines, "_CHUNK_ELEMENTS", chunk_elements)
    torch.testing.assert_close(_slot_gain(candidates, threshold), expected)


def _site(rows: int, channels: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    norms = torch.empty(channels).exponential_(generator=generator) ** 2  # heavy-tailed channel norms
    return torch.randn(rows, channels, generator=generator).abs() * norms


def test_row_sample_estimates_every_permutations_retained_score(monkeypatch):
    """Above the exact work the solvers see a weighted row sample whose retained score is unbiased."""
    pattern = NMPattern(2, 4)
    parts = [_site(300, 64, 0), _site(100, 64, 1) * 3.0]
    assert baselines.solve_shape(400, 64, pattern) == (400, 16)  # exact: every row, nothing sampled
    assert torch.equal(baselines.stack_rows(parts, pattern), torch.cat(parts))
    monkeypatch.setattr(baselines, "solve_shape", lambda rows, channels, pattern: (min(rows, 40), 16))  # keep 40 rows
    generator = torch.Generator().manual_seed(0)
    perm = torch.randperm(64, generator=generator)
    whole = _ratio(torch.cat(parts), perm, pattern)
    samples = [baselines.stack_rows(parts, pattern, generator) for _ in range(400)]
    assert all(s.shape[0] <= 40 for s in samples)
    estimate = sum(_ratio(s, perm, pattern) for s in samples) / len(samples)
    assert abs(estimate / whole - 1) < 0.02


def test_large_sites_are_solved_in_blocks_close_to_the_exact_solution(monkeypatch):
    pattern = NMPattern(2, 4)
    scores = _site(256, 512, 2)  # 128 groups
    exact = _ratio(scores, assignment(scores, pattern), pattern)
    monkeypatch.setattr(baselines, "EXACT_WORK", 256 * 128 * 32)  # blocks of 32 groups, all 256 rows
    monkeypatch.setattr(baselines, "BLOCK_GROUPS", 32)
    assert baselines.solve_shape(256, 512, pattern) == (256, 32)
    blocked = assignment(scores, pattern, torch.Generator().manual_seed(0))
    assert torch.equal(blocked.sort().values, torch.arange(512))
    alloc = _ratio(scores, allocation(scores, pattern), pattern)
    assert alloc < _ratio(scores, blocked, pattern) <= exact * 1.001
    assert _ratio(scores, blocked, pattern) - alloc > 0.5 * (exact - alloc)  # most of the exact solver's gain
