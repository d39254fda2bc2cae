import copy
from dataclasses import replace

import pytest
import torch
from conftest import assert_same_function, tiny_model

from nmperm_plugin import PermuteConfig, permute_
from nmperm_plugin.core.nm import NMPattern, is_nm
from nmperm_plugin.learn.fold import apply_gather
from nmperm_plugin.learn.layers import capture_layer_inputs, run_layer
from nmperm_plugin.learn.learner import LearnConfig, learn
from nmperm_plugin.learn.pipeline import make_run
from nmperm_plugin.learn.run import Run

FAST = dict(steps_per_layer=3, end_to_end_steps=3, select_every=1)


def _config(**kwargs) -> PermuteConfig:
    defaults = dict(block_size=16, sequences_per_step=2, select_sequences=2) | FAST
    return PermuteConfig(**(defaults | kwargs))


def _pruned_weight(model, name):
    module = model.get_submodule(name)
    return getattr(module, "linear", module).weight


@pytest.mark.parametrize("fold", ["exact", "gather"])
@pytest.mark.parametrize(
    "method,objective",
    [
        ("identity", "layerwise"),
        ("allocation", "layerwise"),
        ("ria", "layerwise"),
        ("swap", "layerwise"),
        ("learned", "retained"),
        ("learned", "layerwise"),
        ("learned", "end_to_end"),
        ("learned", "staged"),
    ],
)
def test_every_method_gives_nm_and_permute_only_keeps_function(method, objective, fold, input_ids):
    model = tiny_model("qwen2")
    reference = model(input_ids).logits
    config = _config(method=method, objective=objective, fold=fold)

    permuted = copy.deepcopy(model)
    permute_(permuted, input_ids, _config(method=method, objective=objective, fold=fold, apply_mask=False))
    assert_same_function(permuted(input_ids).logits, reference)

    pruned = copy.deepcopy(model)
    sidecar, result = permute_(pruned, input_ids, config)
    assert len(sidecar.frames) == 14  # 7 linears x 2 layers
    if fold == "gather":
        apply_gather(pruned, sidecar)
    for name in sidecar.frames:
        assert is_nm(_pruned_weight(pruned, name), NMPattern(2, 4)), name
    assert 0.5 < sidecar.figures["retained_ratio"] <= 1.0


def test_learned_beats_or_matches_its_start_and_gradients_flow(input_ids):
    model = tiny_model()
    config = _config(method="learned", objective="layerwise", steps_per_layer=6, lr=0.5)
    run = make_run(model, input_ids, config)
    hidden, kwargs = capture_layer_inputs(model, run.layers, input_ids)
    scores = run.layer_scores(0, hidden, kwargs)
    sites = [s for s in run.sites if s.layer == 0]
    for site in sites + [s for s in run.sites if s.layer is None]:
        run.solve(site, scores if site.layer == 0 else {n: torch.rand(64, 64) for n in site.linears})
    effective = run.effective(run.members(run.layer_linears(0), scores, run.layer_prefixes[0]), sites)
    from nmperm_plugin.learn.losses import LayerwiseObjective

    target = run_layer(run.layers[0], hidden, kwargs[0])
    objective = LayerwiseObjective(run.layers[0], kwargs[0], hidden, target, 2, 4, torch.Generator())
    objective.loss(effective.soft(1.0), 0).backward()
    for key, permuter in effective.permuters.items():
        assert permuter.logits.grad is not None and permuter.logits.grad.abs().sum() > 0, key
    start = objective.select(effective.hard())
    perms, history = learn(effective, objective, config.learner(6))
    assert objective.select(effective.hard(perms)) <= start + 1e-7
    assert len(history) == 7 and all(h["loss"] is not None for h in history[1:])


def test_steps_are_resolved_when_used_never_written_back():
    with pytest.raises(ValueError, match="steps must be 0 or more"):
        learn(None, None, LearnConfig(steps=-1))
    layerwise = PermuteConfig(objective="layerwise")
    assert (layerwise.steps_per_layer, layerwise.end_to_end_steps) == (20, None)
    assert replace(layerwise, objective="end_to_end").total_steps == 80  # no per-layer count carried over
    assert replace(layerwise, objective="end_to_end", fold="gather").total_steps == 120
    assert PermuteConfig(objective="end_to_end", end_to_end_steps=5).total_steps == 5
    from nmperm_plugin.plugins.registry import get_objective

    staged = get_objective("staged").describe(PermuteConfig(objective="staged"))
    assert "20 steps per decoder layer" in staged and "80 steps in all" in staged


def test_nan_weights_refused(input_ids):
    model = tiny_model()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite weights in model.layers.1.mlp.up_proj"):
        permute_(model, input_ids, _config(method="identity"))


def test_pattern_must_divide_channels(input_ids):
    with pytest.raises(ValueError, match="not divisible by M=3"):
        permute_(tiny_model(), input_ids, _config(method="identity", pattern="2:3", block_size=3))


@pytest.mark.parametrize(
    "field,value,needle",
    [
        ("fold", "loose", "unknown fold"),
        ("block_size", 6, "multiple of M"),
        ("pattern", "4:2", "0 < N"),
        ("steps_per_layer", -1, "steps_per_layer must be at least 0"),
        ("end_to_end_steps", -2, "end_to_end_steps must be at least 0"),
        ("sequences_per_step", 0, "sequences_per_step must be at least 1"),
        ("train_dtype", "half", "unknown train_dtype"),
    ],
)
def test_config_validation(field, value, needle):
    with pytest.raises(ValueError, match=needle):
        PermuteConfig(**{field: value})


@pytest.mark.parametrize(
    "field,value", [("method", "magic"), ("scorer", "x"), ("objective", "vibes"), ("init", "guess")]
)
def test_plugin_names_are_checked_when_the_run_starts(field, value, input_ids, monkeypatch):
    """The configuration is plain data; the registry refuses an unregistered name before any work."""
    config = PermuteConfig(**{field: value})  # no registry look-up on construction
    monkeypatch.setattr(Run, "__init__", lambda *a, **k: pytest.fail("the run started"))
    with pytest.raises(ValueError, match=f"unknown {field} '{value}'; choose one of"):
        permute_(tiny_model(), input_ids, config)


def test_learned_global_hidden_site_keeps_function_and_prunes(input_ids):
    model = tiny_model("llama", kv_heads=1, tied=True)
    reference = model(input_ids).logits
    config = _config(method="learned", objective="layerwise", fold="exact", learn_hidden=True, apply_mask=False)
    sidecar, result = permute_(model, input_ids, config)
    assert "hidden" in result.history and len(result.history["hidden"]) == FAST["steps_per_layer"] + 1
    assert_same_function(model(input_ids).logits, reference)
    with pytest.raises(ValueError, match="with fold='exact'"):
        PermuteConfig(fold="gather", learn_hidden=True)
    with pytest.raises(ValueError, match="learn_hidden applies to method='learned'"):
        PermuteConfig(method="ria", fold="exact", learn_hidden=True)
    with pytest.raises(ValueError, match="data-driven objective"):
        PermuteConfig(fold="exact", objective="retained", learn_hidden=True)


@pytest.mark.parametrize("learn_hidden", [False, True])
def test_end_to_end_exact_learns_hidden_only_when_asked(learn_hidden, input_ids, monkeypatch):
    learned_sites = []
    effective = Run.effective

    def recording(run, members, sites):
        learned_sites.extend(site.name for site in sites)
        return effective(run, members, sites)

    monkeypatch.setattr(Run, "effective", recording)
    model = tiny_model("llama", kv_heads=1, tied=True)
    reference = model(input_ids).logits
    config = _config(method="learned", objective="end_to_end", fold="exact", learn_hidden=learn_hidden)
    permuted = copy.deepcopy(model)
    _, result = permute_(permuted, input_ids, replace(config, apply_mask=False))
    assert_same_function(permuted(input_ids).logits, reference)
    assert ("hidden" in learned_sites) == learn_hidden
    assert {"model.layers.0.attn_out", "model.layers.1.mlp_out"} <= set(learned_sites)
    if not learn_hidden:  # kept at the heuristic start: RIA's own global permutation
        _, ria = permute_(copy.deepcopy(model), input_ids, _config(method="ria", fold="exact", apply_mask=False))
        torch.testing.assert_close(result.perms["hidden"], ria.perms["hidden"], atol=0, rtol=0)


@pytest.mark.parametrize("train_dtype,learning_dtype", [("bfloat16", torch.bfloat16), ("float32", torch.float32)])
def test_end_to_end_learns_in_train_dtype_and_selects_in_float32(train_dtype, learning_dtype, input_ids, monkeypatch):
    import nmperm_plugin.learn.window as strategies

    model = tiny_model()
    dtypes = []
    model.model.layers[0].mlp.down_proj.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    real_learn = strategies.learn

    def checked_learn(effective, objective, config, description):
        dtypes.clear()  # the dense passes before learning run in float32
        objective.loss(effective.soft(1.0), 0).backward()
        for key, permuter in effective.permuters.items():
            assert permuter.logits.grad is not None and permuter.logits.grad.abs().sum() > 0, key
        assert set(dtypes) == {learning_dtype}
        dtypes.clear()
        objective.select(effective.hard())
        assert set(dtypes) == {torch.float32}
        return real_learn(effective, objective, config, description)

    monkeypatch.setattr(strategies, "learn", checked_learn)
    config = _config(method="learned", objective="end_to_end", fold="gather", train_dtype=train_dtype)
    sidecar, _ = permute_(model, input_ids, config)
    apply_gather(model, sidecar)
    assert all(is_nm(_pruned_weight(model, name), NMPattern(2, 4)) for name in sidecar.frames)


def test_auto_train_dtype_is_bfloat16_only_where_it_is_fast(monkeypatch):
    import nmperm_plugin.learn.losses as objectives

    cpu = torch.device("cpu")
    assert objectives.training_dtype("float32", cpu) is None
    assert objectives.training_dtype("bfloat16", cpu) is torch.bfloat16
    for fast, expected in ((True, torch.bfloat16), (False, None)):
        monkeypatch.setattr(objectives, "fast_bfloat16", lambda device, fast=fast: fast)
        assert objectives.training_dtype("auto", cpu) is expected


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fold", ["exact", "gather"])
@pytest.mark.parametrize("objective,scorer", [("layerwise", "wanda"), ("end_to_end", "sparsegpt")])
def test_pipeline_runs_where_the_model_is_on_cuda(objective, scorer, fold, input_ids):
    """The learner follows the model onto the GPU: permute-only keeps the function, pruning gives N:M."""
    model = tiny_model("qwen2").cuda()
    reference = copy.deepcopy(model)
    config = _config(method="learned", objective=objective, scorer=scorer, fold=fold, apply_mask=False)
    sidecar, result = permute_(model, input_ids, config)  # input_ids stay on the CPU: the pipeline moves them
    with torch.no_grad():
        ids = input_ids[:2].cuda()
        assert_same_function(model(ids).logits, reference(ids).logits, 1e-4)  # TF32 matmuls
    assert all(perm.device.type == "cpu" for perm in result.perms.values())
    pruned = tiny_model("qwen2").cuda()
    permute_(pruned, input_ids, _config(method="learned", objective=objective, scorer=scorer, fold="exact"))
    assert all(is_nm(_pruned_weight(pruned, name), NMPattern(2, 4)) for name in result.pruned)
