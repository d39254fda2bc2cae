import pytest
import torch
from torch import nn

from nmperm_plugin.learn import EffectiveWeights, Member
from nmperm_plugin.nm import NMPattern, is_nm
from nmperm_plugin.permuter import BlockPermuter
from nmperm_plugin.sinkhorn import anneal, hungarian, log_sinkhorn, perm_matrix, straight_through


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
        effective = permuter.effective_weight(weight, scores, matrices, NMPattern(2, 4), 0.5)
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


def _one_linear(rows: int, channels: int, block: int, recompute: bool) -> EffectiveWeights:
    """Effective weights of one ``[rows, channels]`` linear whose only site is learned in blocks of ``block``."""
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(rows, channels, generator=generator)
    permuter = BlockPermuter(torch.randperm(channels, generator=generator), block, noise=1.0, generator=generator)
    member = Member("proj.weight", weight, weight.abs(), "site")
    return EffectiveWeights([member], nn.ModuleDict({"site": permuter}), recompute=recompute)


def test_effective_weights_recompute_gives_the_direct_values_and_gradients():
    effective = _one_linear(8, 64, 16, recompute=True)
    weight, permuter = effective.members[0].weight, effective.permuters["site"]

    checkpointed = effective.soft(0.5)["proj.weight"]
    checkpointed.square().sum().backward()
    grad_checkpointed, permuter.logits.grad = permuter.logits.grad.clone(), None

    matrices, _ = permuter.sample(0.5, 5)
    direct = permuter.effective_weight(weight, weight.abs(), matrices, NMPattern(2, 4), 0.5)
    direct.square().sum().backward()
    torch.testing.assert_close(checkpointed, direct, rtol=0, atol=0)
    torch.testing.assert_close(grad_checkpointed, permuter.logits.grad, rtol=0, atol=0)
    assert grad_checkpointed.abs().sum() > 0


def test_effective_weights_recompute_keeps_fewer_tensors_for_backward():
    def saved_elements(recompute: bool) -> int:
        weights = _one_linear(32, 256, 64, recompute).soft(0.5)  # samples now; W_eff is built lazily below
        total = 0

        def pack(tensor):
            nonlocal total
            total += tensor.numel()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            weights["proj.weight"]
        return total

    assert saved_elements(recompute=True) < saved_elements(recompute=False) / 2
