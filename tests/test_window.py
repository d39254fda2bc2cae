"""The whole-model and windowed objectives: the layer loop computes the model's own loss, layer
checkpointing changes memory and not the numbers, windows learn their own sites and keep N:M."""

import copy

import pytest
import torch
from conftest import assert_same_function, tiny_model

from nmperm_plugin import PermuteConfig, permute_
from nmperm_plugin.core.nm import NMPattern, is_nm
from nmperm_plugin.learn.layers import capture_layer_inputs
from nmperm_plugin.learn.learner import LazyWeights, Member
from nmperm_plugin.learn.losses import EpochBatches, LayerStack, WindowObjective
from nmperm_plugin.learn.pipeline import make_run
from nmperm_plugin.plugins.registry import get_adapter

FAST = dict(block_size=16, sequences_per_step=2, select_sequences=2, end_to_end_steps=3)
FAST |= dict(select_every=1, select_from=0.0)  # rank every step


def _stack_and_inputs(model, input_ids):
    model.requires_grad_(False)  # as permute_ freezes it
    run = make_run(model, input_ids, PermuteConfig(**FAST))
    hidden, kwargs = capture_layer_inputs(model, run.layers, run.input_ids)
    _, dense = run.dense_pass(hidden, kwargs, list(run.linears), keep_outputs=True)
    stack = LayerStack(list(run.layers), run.layer_prefixes, kwargs, run.adapter.head(model))
    return run, stack, hidden, dense


def _dense_weights(model, run) -> LazyWeights:
    members = [Member(n + ".weight", lin.weight, lin.weight, run.site_of[n].name) for n, lin in run.linears.items()]
    return LazyWeights(members, lambda member: member.weight)


def test_the_layer_loop_computes_the_models_own_loss_and_zero_distillation_when_dense(input_ids):
    model = tiny_model("qwen2")
    run, stack, hidden, dense = _stack_and_inputs(model, input_ids)
    objective = WindowObjective(
        stack, range(len(run.layers)), hidden, dense, run.input_ids, 0.1, 2, 4, torch.Generator().manual_seed(0)
    )
    index = torch.arange(4)
    cross_entropy, distill = objective._terms(_dense_weights(model, run), index, train=False)
    reference = model(input_ids[index], labels=input_ids[index]).loss
    torch.testing.assert_close(cross_entropy, reference, rtol=1e-5, atol=0)
    assert float(distill) == 0.0
    assert objective.select(_dense_weights(model, run)) == pytest.approx(float(reference), rel=1e-5)


def _soft_grads(model, input_ids, checkpoint: bool, window: range | None = None):
    run, stack, hidden, dense = _stack_and_inputs(model, input_ids)
    window = window or range(len(run.layers))
    for site in run.sites:
        run.solve(site, {n: lin.weight.abs() for n, lin in run.linears.items()})
    learned = [s for s in run.sites if s.layer in window]
    names = {n: lin for i in window for n, lin in run.layer_linears(i).items()}
    effective = run.effective(run.members(names, {n: lin.weight.abs() for n, lin in names.items()}, ""), learned)
    objective = WindowObjective(
        stack,
        window,
        hidden,
        dense[window.start : window.stop],
        run.input_ids,
        0.1,
        2,
        2,
        torch.Generator().manual_seed(0),
        checkpoint=checkpoint,
    )
    loss = objective.loss(effective.soft(0.5), 0)
    loss.backward()
    return float(loss), {name: p.grad.clone() for name, p in effective.permuters.named_parameters()}


@pytest.mark.parametrize("window", [None, range(1, 2)])
def test_layer_checkpointing_gives_the_same_loss_and_gradients(input_ids, window):
    model = tiny_model("llama")
    plain_loss, plain = _soft_grads(model, input_ids, checkpoint=False, window=window)
    checkpointed_loss, checkpointed = _soft_grads(model, input_ids, checkpoint=True, window=window)
    assert checkpointed_loss == pytest.approx(plain_loss, rel=1e-6)
    assert plain.keys() == checkpointed.keys() and plain
    for name, grad in plain.items():
        assert grad.abs().sum() > 0, f"no gradient reaches {name}"
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-4, atol=1e-7)


def test_a_window_before_the_end_is_pure_distillation(input_ids):
    model = tiny_model("llama")
    run, stack, hidden, dense = _stack_and_inputs(model, input_ids)
    objective = WindowObjective(stack, range(0, 1), hidden, dense[:1], run.input_ids, 0.1, 2, 2, torch.Generator())
    cross_entropy, distill = objective._terms(_dense_weights(model, run), torch.arange(2), train=False)
    assert float(cross_entropy) == 0.0 and float(distill) == 0.0  # dense weights: the window's output is the target
    with pytest.raises(ValueError, match="dense targets"):
        WindowObjective(stack, range(0, 2), hidden, dense[:1], run.input_ids, 0.1, 2, 2, torch.Generator())


@pytest.mark.parametrize("fold", ["exact", "gather"])
@pytest.mark.parametrize("checkpointing", ["off", "on"])
def test_windows_learn_their_own_sites_keep_function_and_prune_nm(input_ids, fold, checkpointing):
    model = tiny_model("qwen2")
    reference = model(input_ids).logits
    config = PermuteConfig(**FAST, objective="window", window_layers=1, fold=fold, layer_checkpointing=checkpointing)

    permuted = copy.deepcopy(model)
    _, result = permute_(permuted, input_ids, PermuteConfig(**(vars(config) | {"apply_mask": False})))
    assert set(result.history) == {"layers 0-0", "layers 1-1"}
    assert_same_function(permuted(input_ids).logits, reference)

    pruned = copy.deepcopy(model)
    sidecar, _ = permute_(pruned, input_ids, config)
    if fold == "gather":
        from nmperm_plugin.learn.fold import apply_gather

        apply_gather(pruned, sidecar)
    for name in sidecar.frames:
        module = pruned.get_submodule(name)
        assert is_nm(getattr(module, "linear", module).weight, NMPattern(2, 4)), name


def test_every_layer_gets_its_own_keyword_arguments(input_ids):
    """Gemma 2's sliding-window and global layers get different attention masks beyond the window."""
    from conftest import family_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family_config("gemma2")).eval()
    layers = get_adapter(model).decoder_layers(model)
    _, kwargs = capture_layer_inputs(model, layers, input_ids)
    assert len(kwargs) == len(layers) == 2
    masks = [k["attention_mask"] for k in kwargs]
    assert model.config.layer_types[0] != model.config.layer_types[1]
    assert any(m is not None for m in masks)
    assert masks[0] is None or masks[1] is None or not torch.equal(masks[0], masks[1])


def test_a_window_over_every_layer_is_end_to_end(input_ids):
    results = []
    for objective, extra in (("end_to_end", {}), ("window", {"window_layers": 8})):
        model = tiny_model("llama")
        _, result = permute_(model, input_ids, PermuteConfig(**FAST, objective=objective, **extra))
        results.append(result)
    assert results[0].history == results[1].history and set(results[0].history) == {"model"}
    assert all(torch.equal(results[0].perms[k], results[1].perms[k]) for k in results[0].perms)


@pytest.mark.parametrize("objective", ["end_to_end", "window"])
def test_checkpointing_and_cached_fixed_weights_leave_the_result_unchanged(input_ids, objective):
    """Off: fixed sites' masked weights are cached across steps; on: every layer is recomputed in
    backward and nothing is cached. Both are the same computation."""
    results = []
    for checkpointing in ("off", "on"):
        model = tiny_model("qwen2")
        config = PermuteConfig(**FAST, objective=objective, window_layers=1, layer_checkpointing=checkpointing)
        results.append(permute_(model, input_ids, config)[1])
    off, on = results
    for name, history in off.history.items():
        assert [h["select"] for h in history] == pytest.approx([h["select"] for h in on.history[name]], rel=1e-6)
    assert all(torch.equal(off.perms[k], on.perms[k]) for k in off.perms)


@pytest.mark.parametrize("objective", ["end_to_end", "window"])
def test_recomputed_dense_targets_learn_what_kept_ones_do(objective, input_ids, one_thread):
    model = tiny_model("llama")
    fields = dict(FAST, objective=objective, window_layers=1)
    runs = {}
    for setting in ("keep", "recompute"):
        _, result = permute_(copy.deepcopy(model), input_ids, PermuteConfig(**fields, dense_targets=setting))
        runs[setting] = result
    keep, recompute = runs["keep"], runs["recompute"]
    assert {k: v.tolist() for k, v in keep.perms.items()} == {k: v.tolist() for k, v in recompute.perms.items()}
    for label, curve in keep.history.items():
        for kept, recomputed in zip(curve[1:], recompute.history[label][1:], strict=True):  # [0]: the start
            assert kept["loss"] == pytest.approx(recomputed["loss"], rel=1e-5), label


def test_auto_recomputes_the_dense_targets_when_they_do_not_fit(input_ids, monkeypatch):
    from loguru import logger

    from nmperm_plugin.io import checks
    from nmperm_plugin.learn import window as strategies

    monkeypatch.setattr(checks, "available_memory", lambda device: 1024)  # 1 KiB free on the host
    chosen, lines = [], []
    real = strategies.RecomputedTargets
    monkeypatch.setattr(strategies, "RecomputedTargets", lambda *a: chosen.append(a) or real(*a))
    handle = logger.add(lambda message: lines.append(str(message)), level="INFO")
    try:
        permute_(tiny_model("llama"), input_ids, PermuteConfig(**FAST, objective="end_to_end"))
    finally:
        logger.remove(handle)
    assert len(chosen) == 1  # one window over both layers
    assert any("dense targets" in line and "each step recomputes its own" in line for line in lines)
    with pytest.raises(MemoryError, match="dense targets"):  # asked to keep them: refused before the work
        permute_(tiny_model("llama"), input_ids, PermuteConfig(**FAST, objective="end_to_end", dense_targets="keep"))


@pytest.mark.parametrize("count, per_step", [(8, 1), (8, 3), (5, 5), (4, 6)])
def test_steps_take_every_sequence_once_per_pass_and_need_no_state(count, per_step):
    batches = EpochBatches(count, per_step, torch.Generator().manual_seed(0))
    drawn = torch.cat([batches(step) for step in range(4 * count)])  # 4 x count x per_step positions
    taken = min(per_step, count)
    assert all(len(batches(step)) == taken for step in range(3))
    passes = drawn.reshape(-1, count)  # one row per pass over the sequences, in order
    assert all(sorted(row.tolist()) == list(range(count)) for row in passes)
    assert len({tuple(row.tolist()) for row in passes}) > 1  # a new order every pass
    fresh = EpochBatches(count, per_step, torch.Generator().manual_seed(0))
    assert torch.equal(fresh(7), batches(7)) and torch.equal(fresh(2), batches(2))  # any step, in any order
    other = EpochBatches(count, per_step, torch.Generator().manual_seed(1))
    assert not torch.equal(torch.cat([other(s) for s in range(count)]), drawn[: count * taken])
