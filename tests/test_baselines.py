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


# one row and candidate a tile; 3 candidates a tile (ragged); 2 rows of all candidates (ragged); one tile
@pytest.mark.parametrize("chunk_elements", [1, 13 * 3, 10 * 13 * 2 + 5, 2**22])
def test_slot_gain_is_the_formula_at_any_chunk_size(chunk_elements, monkeypatch):
    generator = torch.Generator().manual_seed(0)
    candidates, threshold = torch.rand(7, 10, generator=generator), torch.rand(7, 13, generator=generator)
    expected = (candidates[:, :, None] - threshold[:, None, :]).clamp_min(0).sum(0)  # [candidate, group]
    monkeypatch.setattr(baselines, "_CHUNK_ELEMENTS", chunk_elements)
    torch.testing.assert_close(_slot_gain(candidates, threshold), expected)
