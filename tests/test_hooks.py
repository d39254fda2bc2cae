import types

import pytest
import torch
from conftest import tiny_model

from nmperm_plugin import PermuteConfig, permute_
from nmperm_plugin.core.scores import ChannelStats, MaskGenerator
from nmperm_plugin.plugins.hooks import hookimpl
from nmperm_plugin.plugins.registry import architectures, get_mask_generator, mask_generators, plugin_manager, solvers


def test_builtins_registered_through_hooks():
    assert {"magnitude", "wanda", "ria", "sparsegpt"} <= set(mask_generators())
    assert {"identity", "allocation", "ria", "swap"} <= set(solvers())
    assert any(a.name == "llama" for a in architectures())


def test_unknown_scorer_names_the_registered_ones():
    with pytest.raises(ValueError, match="unknown scorer 'nope'.*magnitude.*wanda"):
        get_mask_generator("nope")


def test_third_party_plugin_adds_a_scorer_and_solver(input_ids):
    calls = []

    def reverse(scores, pattern, rng=None):
        calls.append(scores.shape)
        return torch.arange(scores.shape[1]).flip(0)

    plugin = types.ModuleType("third_party")
    plugin.nmperm_mask_generators = hookimpl(lambda: [MaskGenerator("squared", lambda w, s: w.square())])
    plugin.nmperm_solvers = hookimpl(lambda: {"reverse": reverse})
    manager = plugin_manager()
    manager.register(plugin)
    try:
        sidecar, _ = permute_(tiny_model(), input_ids, PermuteConfig(scorer="squared", method="reverse"))
        assert calls and sidecar.scorer == "squared"
        assert all(p == list(range(len(p)))[::-1] for p in sidecar.permutations.values() if len(p) == 128)
    finally:
        manager.unregister(plugin)
    assert "squared" not in mask_generators()


def test_score_formulas():
    weight = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
    stats = ChannelStats(torch.tensor([4.0, 9.0], dtype=torch.float64), 2)
    torch.testing.assert_close(get_mask_generator("magnitude")(weight, stats), weight.abs())
    torch.testing.assert_close(get_mask_generator("wanda")(weight, stats), weight.abs() * torch.tensor([2.0, 3.0]))
    a = weight.abs()
    ria = (a / a.sum(0) + a / a.sum(1, keepdim=True)) * torch.tensor([2.0, 3.0]).sqrt()
    torch.testing.assert_close(get_mask_generator("ria")(weight, stats), ria)
    stats = ChannelStats.empty(2, with_hessian=True)
    stats.update(torch.randn(50, 2))
    assert get_mask_generator("sparsegpt")(weight, stats).shape == (2, 2)
