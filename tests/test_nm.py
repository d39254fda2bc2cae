import pytest
import torch

from nmperm_plugin.core.nm import (
    NMPattern,
    is_nm,
    nm_mask,
    nm_violations,
    retained_score,
    soft_nm_mask_vjp,
    unstructured_bound,
)


@pytest.mark.parametrize("text,n,m", [("2:4", 2, 4), ("4:8", 4, 8), ("1:4", 1, 4), (" 2 : 4 ", 2, 4)])
def test_parse(text, n, m):
    pattern = NMPattern.parse(text)
    assert (pattern.n, pattern.m) == (n, m)


@pytest.mark.parametrize("text,needle", [("4:2", "0 < N < M"), ("abc", "'N:M'"), ("2:4:8", "'N:M'"), ("0:4", "0 < N")])
def test_parse_rejects(text, needle):
    with pytest.raises(ValueError, match=needle):
        NMPattern.parse(text)


def test_check_dim_names_layer():
    with pytest.raises(ValueError, match="layer.x has 10 input channels, not divisible by M=3"):
        NMPattern(2, 3).check_dim(10, "layer.x")


@pytest.mark.parametrize("pattern", [NMPattern(2, 4), NMPattern(4, 8), NMPattern(1, 4), NMPattern(3, 4)])
def test_mask_is_nm_and_keeps_top(pattern):
    scores = torch.randn(16, 64)
    mask = nm_mask(scores, pattern)
    groups = mask.reshape(16, -1, pattern.m)
    assert (groups.sum(-1) == pattern.n).all()
    kept = scores.reshape(16, -1, pattern.m).where(groups, torch.tensor(float("inf")))
    dropped = scores.reshape(16, -1, pattern.m).where(~groups, torch.tensor(float("-inf")))
    assert (kept.min(-1).values >= dropped.max(-1).values).all()
    assert is_nm(torch.randn(16, 64) * mask, pattern)
    assert float(retained_score(scores.abs(), pattern)) <= float(unstructured_bound(scores.abs(), pattern)) + 1e-4


def test_violations_counted():
    weight = torch.ones(2, 8)
    assert nm_violations(weight, NMPattern(2, 4)) == 4
    assert not is_nm(weight, NMPattern(2, 4))
    assert not is_nm(torch.zeros(2, 6), NMPattern(2, 4))  # 6 columns do not split into groups of 4


def test_constant_scores_still_nm():
    mask = nm_mask(torch.ones(4, 16), NMPattern(2, 4))
    assert (mask.reshape(4, 4, 4).sum(-1) == 2).all()


def test_ties_keep_the_earlier_entries():
    scores = torch.tensor([[1.0, 3.0, 3.0, 3.0, 2.0, 2.0, 2.0, 2.0]])
    assert nm_mask(scores, NMPattern(2, 4)).tolist() == [[False, True, True, False, True, True, False, False]]


SHAPES = [(NMPattern(2, 4), (8, 16)), (NMPattern(4, 8), (3, 32)), (NMPattern(2, 4), (1, 4))]


@pytest.mark.parametrize("pattern,shape", SHAPES)
def test_soft_mask_vjp_is_the_group_softmax_gradient(pattern, shape):
    scores, upstream = 3 * torch.randn(2, *shape)
    before = scores.clone()
    reference = scores.clone().requires_grad_()
    soft = pattern.n * torch.softmax(reference.reshape(shape[0], -1, pattern.m) / 0.5, dim=-1)
    (soft.reshape(shape) * upstream).sum().backward()
    torch.testing.assert_close(soft_nm_mask_vjp(scores, upstream, pattern, 0.5), reference.grad)
    assert torch.equal(scores, before)  # inputs are not modified, even where a plane view is contiguous
