import pytest
import torch
from torch import nn

from nmperm_plugin.core.nm import NMPattern, hard_mask, is_nm
from nmperm_plugin.core.permuter import BlockPermuter, block_matrix_effective_weight, hard_together, sample_together
from nmperm_plugin.core.sinkhorn import anneal, hungarian, log_sinkhorn, perm_matrix, straight_through
from nmperm_plugin.learn.learner import EffectiveWeights, Member


def _is_perm(perm: torch.Tensor) -> bool:
    return torch.equal(perm.sort().values, torch.arange(perm.numel()))


def test_sinkhorn_is_doubly_stochastic():
    soft = log_sinkhorn(torch.randn(3, 8, 8), iters=100).exp()
    assert torch.allclose(soft.sum(-1), torch.ones(3, 8), atol=1e-3)
    assert torch.allclose(soft.sum(-2), torch.ones(3, 8), atol=1e-3)


@pytest.mark.parametrize("kind", ["random", "ties", "constant", "huge", "nan"])
def test_hungarian_always_valid(kind):
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        size = int(torch.randint(2, 40, (1,), generator=generator))
        mats = {
            "random": torch.randn(4, size, size, generator=generator),
            "ties": torch.randint(0, 2, (4, size, size), generator=generator).float(),
            "constant": torch.full((4, size, size), 3.0),
            "huge": torch.randn(4, size, size, generator=generator) * 1e30,
            "nan": torch.full((4, size, size), float("nan")),
        }[kind]
        perms = hungarian(mats)
        assert all(_is_perm(p) for p in perms)


def test_hungarian_recovers_planted_permutation():
    perm = torch.randperm(16)
    assert torch.equal(hungarian(perm_matrix(perm)), perm)
    weight = torch.randn(3, 16)
    assert torch.equal(weight @ perm_matrix(perm), weight[:, perm])


def test_hungarian_on_threads_equals_one_thread():
    """Many matrices are solved in chunks on several threads: the permutations are those of one thread."""
    mats = torch.randn(200, 16, 16, generator=torch.Generator().manual_seed(1))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = hungarian(mats)
        torch.set_num_threads(4)
        threaded = hungarian(mats)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(threaded, single)
    assert all(_is_perm(p) for p in threaded)


def test_permuters_sampled_together_as_one_by_one():
    """One batched Sinkhorn + Hungarian over permuters of two block sizes, one with tied blocks, gives
    each permuter's own matrices, permutations and gradients."""
    generator = torch.Generator().manual_seed(2)

    def permuters():
        return [
            BlockPermuter(
                torch.randperm(32, generator=torch.Generator().manual_seed(0)), 8, noise=1.0, generator=generator
            ),
            BlockPermuter(torch.arange(16), 4, tied_blocks=(0, 0, 1, 1), noise=1.0, generator=generator),
            BlockPermuter(torch.arange(24), 8, noise=1.0, generator=generator),
        ]

    generator.manual_seed(2)
    alone = permuters()
    generator.manual_seed(2)
    together = permuters()
    one_by_one = [p.sample(0.5, 5) for p in alone]
    batched = sample_together(together, 0.5, 5)
    weights = [torch.randn(m.shape, generator=generator) for m, _ in one_by_one]
    for (m1, perm1), (m2, perm2) in zip(one_by_one, batched, strict=True):
        assert torch.equal(perm1, perm2) and _is_perm(perm2)
        assert torch.allclose(m1, m2, atol=1e-6)
    sum((m * w).sum() for (m, _), w in zip(one_by_one, weights, strict=True)).backward()
    sum((m * w).sum() for (m, _), w in zip(batched, weights, strict=True)).backward()
    for p1, p2 in zip(alone, together, strict=True):
        assert p2.logits.grad.abs().sum() > 0
        assert torch.allclose(p1.logits.grad, p2.logits.grad, atol=1e-6)
    assert all(torch.equal(a.hard()[1], b[1]) for a, b in zip(alone, hard_together(together), strict=True))


def test_straight_through_forward_hard_backward_soft():
    logits = torch.randn(2, 8, 8, requires_grad=True)
    matrices, perm = straight_through(logits, tau=0.5, iters=5)
    assert torch.allclose(matrices.detach(), perm_matrix(perm), atol=1e-6)
    (matrices * torch.randn(2, 8, 8)).sum().backward()
    assert logits.grad.abs().sum() > 0


def test_anneal_endpoints():
    assert anneal(0, 10, 1.0, 0.1) == 1.0
    assert abs(anneal(9, 10, 1.0, 0.1) - 0.1) < 1e-12


@pytest.mark.parametrize("scores_kind", ["random", "constant", "ties"])
def test_block_permuter_valid_and_nm(scores_kind):
    generator = torch.Generator().manual_seed(3)
    for trial in range(20):
        base = torch.randperm(64, generator=generator)
        permuter = BlockPermuter(base, 16, noise=float(trial % 3), generator=generator)
        weight = torch.randn(8, 64, generator=generator)
        scores = {"random": weight.abs(), "constant": torch.ones(8, 64), "ties": weight.abs().round()}[scores_kind]
        matrices, perm = permuter.sample(tau=0.3, iters=5)
        assert _is_perm(perm) and _is_perm(permuter.hard()[1])
        effective = permuter.effective_weight(weight, scores, matrices, perm, NMPattern(2, 4), 0.5)
        assert is_nm(effective[:, perm], NMPattern(2, 4))
        effective.square().sum().backward()
        assert permuter.logits.grad is not None and torch.isfinite(permuter.logits.grad).all()


def test_block_permuter_starts_at_base_and_ties_blocks():
    base = torch.randperm(32)
    assert torch.equal(BlockPermuter(base, 8, noise=0.0).hard()[1], base)
    tied = BlockPermuter(torch.arange(32), 8, tied_blocks=(0, 0, 1, 1), noise=1.0)
    _, perm = tied.sample(1.0, 5)
    within = perm.reshape(4, 8) - torch.arange(4)[:, None] * 8
    assert torch.equal(within[0], within[1]) and torch.equal(within[2], within[3])


@pytest.mark.parametrize("tied_blocks", [None, (0, 1, 0, 1)])
@pytest.mark.parametrize("pattern", [NMPattern(2, 4), NMPattern(4, 8)])
def test_effective_weight_matches_the_block_matrix_formula(tied_blocks, pattern):
    generator = torch.Generator().manual_seed(11)
    permuter = BlockPermuter(torch.randperm(64, generator=generator), 16, tied_blocks, noise=2.0, generator=generator)
    weight, probe = torch.randn(2, 12, 64, generator=generator)
    scores = weight.abs() * torch.rand(64, generator=generator)

    gradients, values = [], []
    for compute in ("fast", "reference"):
        permuter.logits.grad = None
        matrices, perm = permuter.sample(tau=0.4, iters=5)
        if compute == "fast":
            value = permuter.effective_weight(weight, scores, matrices, perm, pattern, 0.5)
        else:
            value = block_matrix_effective_weight(permuter, weight, scores, matrices, pattern, 0.5)
        (value * probe).sum().backward()
        values.append(value.detach())
        gradients.append(permuter.logits.grad.clone())
    torch.testing.assert_close(values[0], values[1], rtol=1e-6, atol=1e-6)  # the reference rounds (hard + soft - soft)
    torch.testing.assert_close(gradients[0], gradients[1], rtol=1e-4, atol=1e-5)
    assert gradients[0].abs().sum() > 0
    assert torch.equal(values[0], weight * hard_mask(scores, perm, pattern))


def test_effective_weight_keeps_no_intermediates_for_backward():
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(32, 256, generator=generator)
    permuter = BlockPermuter(torch.randperm(256, generator=generator), 64, noise=1.0, generator=generator)
    member = Member("proj.weight", weight, weight.abs(), "site")
    weights = EffectiveWeights([member], nn.ModuleDict({"site": permuter})).soft(0.5)  # W_eff is built lazily
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        weights["proj.weight"]
    inputs = 2 * weight.numel() + 256 + permuter.logits.numel()  # weight, scores, perm, the block matrices
    assert 0 < sum(saved) <= inputs
