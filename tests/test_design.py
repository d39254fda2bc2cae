"""The design's contracts: one configuration schema reaches every front end, objectives are plugins,
learning beats its start on a planted problem, masks and folds behave in the corners."""

import ast
import copy
import json
import types
from pathlib import Path

import pytest
import torch
from conftest import assert_same_function, tiny_model

import nmperm_plugin
from nmperm_plugin import PermuteConfig, permute_
from nmperm_plugin.cli.commands import build_parser, main
from nmperm_plugin.cli.options import flag
from nmperm_plugin.config import default_of, markdown_table, schema
from nmperm_plugin.core.nm import NMPattern, is_nm
from nmperm_plugin.core.ops import function_error, function_tolerance
from nmperm_plugin.io.sidecar import SIDECAR_NAME, Sidecar
from nmperm_plugin.learn.sequential import Layerwise
from nmperm_plugin.llmcompressor.modifier import LearnedPermutationModifier
from nmperm_plugin.plugins.hooks import hookimpl
from nmperm_plugin.plugins.registry import names, plugin_manager

ROOT = Path(__file__).resolve().parents[1]


def _prune_parser():
    commands = next(a for a in build_parser()._actions if a.dest == "command")
    return commands.choices["prune"]


def test_every_schema_field_is_a_cli_flag_and_a_modifier_field_with_its_default():
    actions = {option: a for a in _prune_parser()._actions for option in a.option_strings}
    for spec in schema():
        if "cli" in spec.metadata["front_ends"]:
            assert flag(spec.name) in actions, f"{spec.name} has no `nmperm prune` flag"
            assert actions[flag(spec.name)].dest == spec.name
            assert actions[flag(spec.name)].default == spec.default, spec.name
        if "modifier" in spec.metadata["front_ends"]:
            assert spec.name in LearnedPermutationModifier.model_fields, f"{spec.name} is not a modifier field"
            assert LearnedPermutationModifier.model_fields[spec.name].default == default_of(spec, "modifier")
    assert {s.name for s in schema()} - {s.name for s in schema("modifier")} == {"ignore"}  # llm-compressor syntax


def test_cli_flags_build_the_same_config_as_python():
    args = _prune_parser().parse_args(
        ["m", "--dataset", "d", "--lr", "0.3", "--end-to-end-steps", "7", "--learn-hidden", "--ignore", "a", "b"]
    )
    config = nmperm_plugin.cli.options.config_from_args(args)
    assert config == PermuteConfig(lr=0.3, end_to_end_steps=7, learn_hidden=True, ignore=("a", "b"))
    assert _prune_parser().parse_args(["m", "--dataset", "d", "--permute-only"]).apply_mask is False


def test_the_docs_table_of_fields_is_current():
    text = (ROOT / "docs" / "configuration.md").read_text()
    assert markdown_table(names) in text, "regenerate docs/configuration.md: python -m nmperm_plugin.cli.options"


def _import_graph() -> dict[str, set[str]]:
    """Every package module's imports of package modules: module level, inside functions and under
    ``TYPE_CHECKING`` alike (a function-level import is a dependency all the same)."""
    package = ROOT / "nmperm_plugin"
    graph = {}
    for path in package.rglob("*.py"):
        if "tasks" in path.relative_to(package).parts:  # lm-eval task helpers, loaded by lm-eval
            continue
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        imports = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = name.split(".")[: len(name.split(".")) - node.level + (path.name == "__init__.py")]
                target = ".".join(base + ([node.module] if node.module else []))
                imports |= {f"{target}.{a.name}" for a in node.names} | ({target} if node.module else set())
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("nmperm_plugin"):
                imports |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                imports |= {a.name for a in node.names if a.name.startswith("nmperm_plugin")}
        graph[name] = imports
    return {n: {i for i in deps if i in graph and i != n} for n, deps in graph.items()}


def test_no_import_cycles_between_package_modules():
    """Every import of the package, function-level ones included, points one way (a topological order exists)."""
    graph = _import_graph()
    assert "nmperm_plugin.learn.learner" in graph["nmperm_plugin.learn.losses"]  # the walk sees relative imports
    done, visiting = set(), []

    def visit(node):
        if node in visiting:
            raise AssertionError("import cycle: " + " -> ".join(visiting[visiting.index(node) :] + [node]))
        if node not in done:
            visiting.append(node)
            for dep in graph[node]:
                visit(dep)
            visiting.pop()
            done.add(node)

    for node in graph:
        visit(node)


# the layers, bottom to top (docs/plugins.md); a module imports only from its own layer or those below
LAYERS = (
    ("compat", "_startup"),  # _startup: what the package does first on import (quiet Ctrl-C)
    ("core",),
    ("arch",),
    ("config",),
    ("plugins",),  # hook specs and the registry; the built-in plugin is registered from above (builtin)
    ("io",),
    ("data",),
    ("runtime",),
    ("learn",),
    ("builtin", "api", "parts"),
    ("llmcompressor", "export", "eval"),
    ("cli",),
)


def _layer(module: str) -> int:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    if top == "__init__":
        return len(LAYERS)  # the package itself re-exports the public API
    return next(i for i, names in enumerate(LAYERS) if top in names)


def test_dependencies_point_down_the_layers():
    upward = [
        f"{module} -> {dep}" for module, deps in _import_graph().items() for dep in deps if _layer(dep) > _layer(module)
    ]
    assert not upward, "imports against the layer order: " + ", ".join(sorted(upward))


# -- a third-party objective: the loss is the decoder layer's cosine error (a dozen lines) -------------
class CosineError(nmperm_plugin.learn.learner.Objective):
    def __init__(self, layer, kwargs, inputs, target):
        self.layer, self.kwargs, self.inputs, self.target = layer, kwargs, inputs, target

    def loss(self, weights, step):
        out = torch.func.functional_call(self.layer, dict(weights), (self.inputs,), self.kwargs)[0]
        return 1 - torch.nn.functional.cosine_similarity(out, self.target, dim=-1).mean()


class CosineLayerwise(Layerwise):
    name = "cosine"

    def layer_loss(self, run, index, inputs, kwargs, target):
        calls.append(index)
        return CosineError(run.layers[index], kwargs, inputs, target)


calls: list[int] = []


@pytest.fixture
def cosine_plugin():
    plugin = types.ModuleType("cosine_plugin")
    plugin.nmperm_objectives = hookimpl(lambda: [CosineLayerwise()])
    plugin_manager().register(plugin)
    calls.clear()
    yield
    plugin_manager().unregister(plugin)


def test_a_plugin_objective_runs_through_nmperm_prune(cosine_plugin, saved_model, tmp_path):
    model_dir, text = saved_model
    out = tmp_path / "out"
    args = ["prune", str(model_dir), "--dataset", str(text), "--output", str(out), "--objective", "cosine"]
    assert main(args + ["--num-samples", "4", "--seq-len", "32", "--block-size", "16", "--steps-per-layer", "2"]) == 0
    assert calls == [0, 1] and Sidecar.load(out).method == "learned/cosine"
    assert main(["verify", str(out)]) == 0


def test_a_plugin_objective_runs_through_the_modifier(cosine_plugin):
    from test_modifier import _state

    model = tiny_model()
    modifier = LearnedPermutationModifier(objective="cosine", steps_per_layer=2, block_size=16, apply_mask=True)
    modifier.initialize(_state(model))
    assert calls == [0, 1] and modifier.sidecar.method == "learned/cosine"
    assert all(is_nm(model.get_submodule(n).weight, NMPattern(2, 4)) for n in modifier.result.pruned)


# -- behaviour ----------------------------------------------------------------------------------------
def test_learning_beats_its_heuristic_start_on_a_planted_problem(input_ids):
    """In every block of 16 down_proj inputs the first 8 columns are large: the identity order puts
    them in 2 whole groups of 4 (the 2:4 mask drops half of them), while an order that interleaves
    them keeps all. Learning from identity must find a clearly better permutation."""
    model = tiny_model()
    with torch.no_grad():
        for layer in model.model.layers:
            weight = layer.mlp.down_proj.weight  # [64, 128]: 8 blocks of 16 input channels
            weight.copy_(weight.sign() * (0.01 + 0.001 * torch.rand_like(weight)))
            weight.view(64, 8, 16)[:, :, :8] *= 100
    common = dict(scorer="magnitude", objective="retained", block_size=16, steps_per_layer=40, lr=0.5, seed=0)
    start = permute_(copy.deepcopy(model), input_ids, PermuteConfig(method="identity", **common))[1]
    learned = permute_(copy.deepcopy(model), input_ids, PermuteConfig(method="learned", init="identity", **common))[1]
    for index in ("0", "1"):
        history = learned.history[f"model.layers.{index}.mlp_out"]
        assert min(h["select"] for h in history if h["select"] is not None) < history[0]["select"] - 0.05
    assert sum(learned.retained.values()) > sum(start.retained.values()) + 0.02


def test_unstructured_masks_keep_the_density_per_row_not_per_group(input_ids):
    model = tiny_model()
    sidecar, result = permute_(model, input_ids, PermuteConfig(method="identity", unstructured=True))
    weights = [model.get_submodule(name).weight for name in result.pruned]
    assert all(((w != 0).sum(1) == w.shape[1] // 2).all() for w in weights)
    assert not all(is_nm(w, NMPattern(2, 4)) for w in weights)


def test_an_ignored_linear_is_permuted_but_left_dense(input_ids):
    model = tiny_model()
    reference = model(input_ids).logits
    config = PermuteConfig(method="ria", fold="exact", ignore=(r"layers\.0\.mlp\.down_proj$",))
    permuted = copy.deepcopy(model)
    permute_(permuted, input_ids, PermuteConfig(**(vars(config) | {"apply_mask": False})))
    assert_same_function(permuted(input_ids).logits, reference)
    sidecar, result = permute_(model, input_ids, config)
    assert "model.layers.0.mlp.down_proj" not in result.pruned and "model.layers.1.mlp.down_proj" in result.pruned
    ignored = model.model.layers[0].mlp.down_proj.weight
    assert (ignored != 0).all() and not torch.equal(ignored, tiny_model().model.layers[0].mlp.down_proj.weight)
    assert all(is_nm(model.get_submodule(name).weight, NMPattern(2, 4)) for name in result.pruned)


def test_a_bfloat16_model_folds_within_its_precision(input_ids):
    model = tiny_model("qwen2").to(torch.bfloat16)
    reference = model(input_ids).logits
    permute_(model, input_ids, PermuteConfig(method="ria", fold="exact", apply_mask=False, block_size=16))
    error = function_error(reference, model(input_ids).logits)
    assert 0 < error <= function_tolerance(torch.bfloat16)  # rounding moved, the function did not


def test_a_sidecar_of_another_format_version_is_refused(tmp_path):
    sidecar = Sidecar(pattern="2:4", scorer="wanda", method="ria", fold="exact", architecture="llama")
    sidecar.save(tmp_path)
    data = json.loads((tmp_path / SIDECAR_NAME).read_text())
    (tmp_path / SIDECAR_NAME).write_text(json.dumps(data | {"format": "nmperm-sidecar/99"}))
    with pytest.raises(ValueError, match="unknown sidecar format 'nmperm-sidecar/99'"):
        Sidecar.load(tmp_path)
