"""SparseGPT's reconstruction for given masks: the arithmetic against llm-compressor's, and the
pipeline option that applies the learned masks with it."""

import copy

import pytest
import torch
from conftest import tiny_model

from nmperm_plugin import PermuteConfig, permute_
from nmperm_plugin.core.nm import NMPattern, is_nm
from nmperm_plugin.core.reconstruct import reconstruct, sparsegpt_update


def _inputs(columns: int, tokens: int = 512, seed: int = 0) -> torch.Tensor:
    """Correlated inputs with uneven channel scales, as a transformer's activations are."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(columns, columns, generator=g) / columns**0.5 + torch.eye(columns)
    return torch.randn(tokens, columns, generator=g) @ mix * torch.rand(columns, generator=g).add(0.2) * 3


def _error(weight: torch.Tensor, other: torch.Tensor, x: torch.Tensor) -> float:
    return float(((weight - other) @ x.T).square().sum())


def test_same_update_as_llm_compressor_sparsegpt_for_its_own_masks():
    from llmcompressor.modifiers.pruning.sparsegpt.sgpt_sparsify import sparsify_weight

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 24, bias=False)
    x = _inputs(64)
    hessian = x.T @ x
    _, expected = sparsify_weight(linear, {linear: hessian.clone()}, 0.5, 2, 4, 16, 0.01, False)
    keep = expected != 0  # SparseGPT's own 2:4 masks
    assert is_nm(expected, NMPattern(2, 4))
    actual = sparsegpt_update(linear.weight.detach(), keep, hessian.double(), damp=0.01, block_size=16)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def _least_squares(weight: torch.Tensor, keep: torch.Tensor, hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Each row's exact optimum for its kept set, one linear solve per row (float64)."""
    h = hessian.double() + damp * hessian.diagonal().mean().double() * torch.eye(hessian.shape[0], dtype=torch.float64)
    best = torch.zeros_like(weight, dtype=torch.float64)
    for row, kept in enumerate(keep):
        rhs = (weight[row].double() @ h)[kept]
        best[row, kept] = torch.linalg.solve(h[kept][:, kept], rhs)
    return best.float()


def _random_2of4(rows: int, columns: int, generator: torch.Generator) -> torch.Tensor:
    keep = torch.zeros(rows, columns // 4, 4, dtype=torch.bool)
    keep.scatter_(2, torch.rand(rows, columns // 4, 4, generator=generator).argsort(2)[..., :2], True)
    return keep.reshape(rows, columns)  # any 2 of 4: a learned mask, not SparseGPT's own


def test_given_masks_reach_the_least_squares_weights_far_below_sparsegpts_pass():
    g = torch.Generator().manual_seed(1)
    weight, x = torch.randn(32, 64, generator=g), _inputs(64, seed=1)
    keep, hessian = _random_2of4(32, 64, g), x.T @ x
    best = _error(weight, _least_squares(weight, keep, hessian, 0.01), x)
    one_pass = _error(weight, sparsegpt_update(weight, keep, hessian), x)
    masked = _error(weight, weight * keep, x)
    updated = reconstruct(weight, keep, hessian, iterations=20)
    assert torch.equal(updated != 0, keep) and is_nm(updated, NMPattern(2, 4))
    assert best < one_pass < masked  # SparseGPT's pass helps, but stops well short of the optimum here
    assert _error(weight, updated, x) <= 1.01 * best
    assert torch.equal(reconstruct(weight, keep, hessian, iterations=0), sparsegpt_update(weight, keep, hessian))
    full = torch.ones_like(keep)
    torch.testing.assert_close(reconstruct(weight, full, hessian), weight)  # nothing pruned: nothing moves


def test_refuses_shapes_that_disagree():
    with pytest.raises(ValueError, match="shapes disagree"):
        reconstruct(torch.randn(4, 8), torch.ones(4, 8, dtype=torch.bool), torch.eye(4))


def _logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids).logits


@pytest.mark.parametrize("objective", ["end_to_end", "layerwise"])
def test_reconstruct_keeps_the_learned_masks_and_lowers_the_error(objective, input_ids):
    dense = tiny_model()
    base = dict(block_size=16, steps_per_layer=2, end_to_end_steps=2, select_every=1, objective=objective)
    outputs = {}
    for updated in (False, True):
        model = copy.deepcopy(dense)
        sidecar, result = permute_(model, input_ids, PermuteConfig(**base, reconstruct=updated))
        for name in sidecar.frames:
            assert is_nm(model.get_submodule(name).weight, NMPattern(2, 4)), name
        outputs[updated] = (_logits(model, input_ids), sidecar, result)
    plain, with_update = outputs[False], outputs[True]
    assert plain[2].perms.keys() == with_update[2].perms.keys()
    for site, perm in plain[2].perms.items():  # the same permutations where the inputs are the same
        if objective == "end_to_end" or site.startswith("model.layers.0."):  # layerwise: later layers see
            assert torch.equal(perm, with_update[2].perms[site]), site  # the reconstructed earlier ones
    reference = _logits(dense, input_ids)
    error = {k: float((v[0] - reference).square().mean()) for k, v in outputs.items()}
    assert error[True] < error[False], error


def test_reconstruct_masks_are_the_plain_runs(input_ids):
    """end_to_end scores every layer on the dense model, so the update changes kept weights only:
    the zeros are where the plain run put them."""
    dense = tiny_model()
    config = dict(block_size=16, end_to_end_steps=2, select_every=1, objective="end_to_end")
    plain, updated = copy.deepcopy(dense), copy.deepcopy(dense)
    permute_(plain, input_ids, PermuteConfig(**config))
    permute_(updated, input_ids, PermuteConfig(**config, reconstruct=True))
    changed = 0
    for (name, a), (_, b) in zip(plain.named_parameters(), updated.named_parameters(), strict=True):
        if a.ndim == 2 and "embed" not in name and "lm_head" not in name:
            assert torch.equal(a == 0, b == 0), name
            changed += int(not torch.equal(a, b))
    assert changed > 0


def test_reconstruct_needs_apply_mask():
    with pytest.raises(ValueError, match="needs apply_mask"):
        PermuteConfig(reconstruct=True, apply_mask=False)


def test_distillation_keeps_the_masks_and_lowers_the_distance_to_the_dense_model(input_ids):
    dense = tiny_model()
    config = dict(block_size=16, method="ria", objective="layerwise", reconstruct=True, sequences_per_step=2)
    plain, distilled = copy.deepcopy(dense), copy.deepcopy(dense)
    permute_(plain, input_ids, PermuteConfig(**config))
    _, result = permute_(distilled, input_ids, PermuteConfig(**config, distill_steps=12, distill_lr=1e-3))
    curve = result.history["distillation"]
    assert len(curve) == 13 and curve[-1]["select"] < curve[0]["select"]
    reference = torch.log_softmax(_logits(dense, input_ids), -1)

    def kl(model) -> float:
        log_p = torch.log_softmax(_logits(model, input_ids), -1)
        return float(torch.nn.functional.kl_div(log_p, reference, log_target=True, reduction="batchmean"))

    assert kl(distilled) < kl(plain)
    for (name, a), (_, b) in zip(plain.named_parameters(), distilled.named_parameters(), strict=True):
        if a.ndim == 2 and "embed" not in name and "lm_head" not in name:
            assert torch.equal(a == 0, b == 0), name  # the same masks, the kept weights trained
            assert is_nm(b, NMPattern(2, 4)), name


def test_distillation_needs_apply_mask():
    with pytest.raises(ValueError, match="needs apply_mask"):
        PermuteConfig(distill_steps=4, apply_mask=False)


def test_end_to_end_distillation_takes_its_targets_from_the_learners_dense_pass(input_ids, monkeypatch):
    from nmperm_plugin.learn import pipeline
    from nmperm_plugin.learn.window import EndToEnd

    config = PermuteConfig(
        block_size=16, objective="end_to_end", end_to_end_steps=2, reconstruct=True, distill_steps=3,
        distill_lr=1e-3, sequences_per_step=2,
    )  # fmt: skip
    dense = tiny_model()
    calls = []
    counted = pipeline.dense_targets
    monkeypatch.setattr(pipeline, "dense_targets", lambda *a: calls.append(1) or counted(*a))
    shared = copy.deepcopy(dense)
    permute_(shared, input_ids, config)
    assert calls == []  # the objective's dense pass kept them: no second dense pass
    monkeypatch.setattr(EndToEnd, "keeps_dense_outputs", False)  # the targets from a pass of their own
    separate = copy.deepcopy(dense)
    permute_(separate, input_ids, config)
    assert calls == [1]
    for (name, a), (_, b) in zip(shared.named_parameters(), separate.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_linears_fed_one_input_share_their_statistics_accumulated_once(input_ids):
    """q/k/v and gate/up see the very same tensor: one ChannelStats each group, equal to what each
    linear collects alone; a tensor changed in place between two linears is not shared."""
    from nmperm_plugin.learn.layers import capture_layer_inputs, collect_stats

    model = tiny_model()
    layers = model.model.layers
    hidden, kwargs = capture_layer_inputs(model, layers, input_ids)
    names = {n: m for n, m in layers[0].named_modules() if isinstance(m, torch.nn.Linear)}
    stats, output = collect_stats(layers[0], names, hidden, kwargs[0], hessian=True)
    assert stats["self_attn.q_proj"] is stats["self_attn.k_proj"] is stats["self_attn.v_proj"]
    assert stats["mlp.gate_proj"] is stats["mlp.up_proj"]
    assert len({id(s) for s in stats.values()}) == 4  # qkv, o, gate/up, down
    for name, linear in names.items():
        alone, alone_output = collect_stats(layers[0], {name: linear}, hidden, kwargs[0], hessian=True)
        assert torch.equal(alone[name].hessian, stats[name].hessian), name
        assert torch.equal(alone[name].sq_norm, stats[name].sq_norm) and alone[name].tokens == stats[name].tokens
        assert torch.equal(alone_output, output)

    class InPlace(torch.nn.Module):  # the second linear's input is the first's, scaled in place
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

        def forward(self, x):
            x = x.clone()
            y = self.a(x)
            x.mul_(2)
            return y + self.b(x)

    module = InPlace()
    stats, _ = collect_stats(module, {"a": module.a, "b": module.b}, torch.randn(2, 3, 8), {}, hessian=True)
    assert stats["a"] is not stats["b"]
    assert torch.allclose(stats["b"].hessian, 4 * stats["a"].hessian)
