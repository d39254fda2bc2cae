"""Weights stored other than as ``nn.Linear [out, in]``: mixture-of-experts' fused 3-D expert tensors
(Mixtral, Qwen2-MoE, Qwen3-MoE) and GPT-2's ``Conv1D [in, out]``. The adapters' linear form
(views, written back), each expert its own ``mlp_out`` site, the router folded, N:M of the stored
tensors along their input dimension, the checkpoint names Mixtral saves its experts under.
(tests/test_architectures.py runs the common fold, prune and verify cases on these families too.)"""

import copy
import json

import pytest
import torch
from conftest import assert_same_function, family_model
from test_architectures import _prune_config, exact_fold
from transformers.pytorch_utils import Conv1D

from nmperm_plugin import permute_
from nmperm_plugin.arch.gpt2 import GPT2Adapter
from nmperm_plugin.arch.moe import MixtralAdapter, MoEAdapter, QwenMoEAdapter
from nmperm_plugin.core.nm import NMPattern, is_nm
from nmperm_plugin.core.ops import function_error
from nmperm_plugin.io.checkpoint import finish_sidecar
from nmperm_plugin.plugins.registry import get_adapter

MOE = ("mixtral", "qwen2_moe", "qwen3_moe")
PATTERN = NMPattern(2, 4)


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, 300, (6, 32), generator=torch.Generator().manual_seed(1))


def test_expert_sites():
    """Every expert's down projection is an mlp_out site of its own (and the shared expert's); a dense
    layer keeps one; the router is no site's linear."""
    model = family_model("qwen2_moe")  # layer 0: 4 experts and a shared expert; layer 1: dense (mlp_only_layers)
    sites = {s.name: s for s in get_adapter(model).sites(model, "exact")}
    mlp_out = sorted(name for name, s in sites.items() if s.kind == "mlp_out")
    expected = [f"model.layers.0.mlp.experts.{e}.mlp_out" for e in range(4)] + [
        "model.layers.0.mlp.shared_expert.mlp_out"
    ]
    assert mlp_out == sorted(expected + ["model.layers.1.mlp_out"])
    assert sites["model.layers.0.mlp.experts.2.mlp_out"].linears == ("model.layers.0.mlp.experts.2.down_proj",)
    assert (
        sites["model.layers.0.mlp.experts.2.mlp_out"].channels == 32 and sites["model.layers.1.mlp_out"].channels == 128
    )
    readers = sites["hidden"].linears
    assert "model.layers.0.mlp.experts.3.up_proj" in readers and "model.layers.0.mlp.shared_expert.gate_proj" in readers
    assert not any(name.endswith(("mlp.gate", "shared_expert_gate")) for s in sites.values() for name in s.linears)


@pytest.mark.parametrize("family", [*MOE, "gpt2"])
@torch.no_grad()
def test_linear_form_is_views_written_back(family, ids):
    """In the linear form every site's weight is an nn.Linear view computing the same function; a
    change in place reaches the stored tensor, a replaced weight is written back on exit, and the
    stored modules come back (nested uses change nothing)."""
    model = family_model(family)
    adapter, reference, before = get_adapter(model), model(ids).logits, copy.deepcopy(model.state_dict())
    modules = {n: type(m) for n, m in model.named_modules()}
    sites = adapter.sites(model, "exact")
    name = next(s for s in sites if s.kind == "mlp_out" and s.layer == 0).linears[0]
    with adapter.linear_form(model), adapter.linear_form(model):
        linear = model.get_submodule(name)
        assert type(linear) is torch.nn.Linear and not linear.weight.requires_grad
        assert_same_function(model(ids).logits, reference, 1e-6)
        assert all(type(model.get_submodule(n)) is torch.nn.Linear for s in sites for n in s.linears)
        linear.weight[0, 0] = 7.0  # in place: the stored tensor itself
        replaced = linear.weight.data.clone()
        replaced[1, 1] = 9.0
        linear.weight.data = replaced  # a new tensor, as a fold makes
    assert {n: type(m) for n, m in model.named_modules()} == modules  # the stored modules are back
    with adapter.linear_form(model):
        weight = model.get_submodule(name).weight
        assert float(weight[0, 0]) == 7.0 and float(weight[1, 1]) == 9.0
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) == 1 and changed[0].endswith(("experts.down_proj", "mlp.c_proj.weight")), changed


@pytest.mark.parametrize(
    "family,attribute,broken",
    [
        ("mixtral", "mlp_routers", lambda self, layer: ()),  # the router reads the permuted residual stream
        ("qwen2_moe", "mlp_routers", lambda self, layer: MoEAdapter.mlp_routers(self, layer)[:1]),  # shared gate too
        ("gpt2", "value_offset", lambda self, model: 0),  # the value rows are the last third of c_attn
    ],
)
def test_a_wrong_fold_is_caught(family, attribute, broken, ids, monkeypatch):
    model = family_model(family)
    adapter = type(get_adapter(model))
    assert adapter in (MixtralAdapter, QwenMoEAdapter, GPT2Adapter)
    monkeypatch.setattr(adapter, attribute, broken)
    error = function_error(model(ids).logits, exact_fold(model)(ids).logits)
    assert error > 1e-3, error


def stored_pruned_weights(model) -> dict[str, torch.Tensor]:
    """Each pruned weight as stored, turned to ``[out, in]`` here, not by the adapter: an expert's slice
    of the fused tensors, a ``Conv1D``'s transpose, an ``nn.Linear``'s weight."""
    weights = {}
    for name, module in model.named_modules():
        if hasattr(module, "gate_up_proj"):  # fused experts: [E, 2I, D] and [E, D, I]
            for e in range(module.num_experts):
                weights[f"{name}.{e}.gate_up_proj"] = module.gate_up_proj[e]
                weights[f"{name}.{e}.down_proj"] = module.down_proj[e]
        elif isinstance(module, Conv1D):
            weights[name] = module.weight.T
        elif isinstance(module, torch.nn.Linear) and ".layers." in name and not name.endswith("shared_expert_gate"):
            weights[name] = module.weight
    return weights


@pytest.mark.parametrize("family", [*MOE, "gpt2"])
@pytest.mark.parametrize("method", ["learned/end_to_end", "ria"])
def test_stored_weights_are_nm_along_their_input(family, method, ids):
    """After pruning (exact fold) every pruned tensor as stored is 2:4 along its input dimension, the
    router and the shared-expert gate stay dense, and the model loads its function from disk."""
    model = family_model(family)
    sidecar, _ = permute_(model, ids, _prune_config(method, "exact"))
    weights = stored_pruned_weights(model)
    assert len(weights) >= 8
    assert all(is_nm(w, PATTERN) for w in weights.values()), [n for n, w in weights.items() if not is_nm(w, PATTERN)]
    routers = [m.weight for n, m in model.named_modules() if n.endswith(("mlp.gate", "shared_expert_gate"))]
    assert all(not is_nm(w, PATTERN) for w in routers) and len(routers) == {"qwen2_moe": 2, "gpt2": 0}.get(family, 2)


@pytest.mark.parametrize("family", ["mixtral", "gpt2"])
@pytest.mark.parametrize(
    "method,extra",
    [("learned/layerwise", {"learn_hidden": True}), ("learned/window", {"window_layers": 1}), ("learned/retained", {})],
)
def test_every_objective_runs_on_the_linear_form(family, method, extra, ids):
    """The joint hidden-site learner, a one-layer window and the retained objective keep the function
    (masks not applied) and prune the stored tensors to 2:4."""
    model = family_model(family)
    with torch.no_grad():
        reference = model(ids).logits
    permuted = copy.deepcopy(model)
    permute_(permuted, ids, _prune_config(method, "exact", apply_mask=False, **extra))
    with torch.no_grad():
        assert_same_function(permuted(ids).logits, reference)
    permute_(model, ids, _prune_config(method, "exact", **extra))
    assert all(is_nm(w, PATTERN) for w in stored_pruned_weights(model).values())


def test_mixtral_checksums_name_the_saved_experts(ids, tmp_path):
    model = family_model("mixtral")
    sidecar, _ = permute_(model, ids, _prune_config("ria", "exact"))
    model.save_pretrained(tmp_path)
    finish_sidecar(tmp_path, sidecar)  # verifies: raises if a checksum is missing or wrong
    saved = json.loads((tmp_path / "nmperm.json").read_text())["checksums"]
    assert len(saved) == len(sidecar.frames) == 2 * (4 + 4 * 3)  # q, k, v, o and 4 experts x 3, 2 layers
    assert MixtralAdapter().checkpoint_key("model.layers.1.mlp.experts.3.down_proj") == (
        "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    )


@pytest.mark.parametrize(
    "family,fold", [("mixtral", "exact"), ("qwen2_moe", "gather"), ("gpt2", "exact"), ("gpt2", "gather")]
)
def test_torchao_export_sees_every_pruned_weight_as_a_linear(family, fold, ids, tmp_path):
    """The torchao export puts the model in its linear form for good (``to_linear_``; gather: after the
    gathers, GPT-2's c_proj inside its GatherLinear): every pruned expert slice and Conv1D is a 2:4
    layer ready to convert, none is missing, and the function holds."""
    from nmperm_plugin.export.directory import export_checkpoint
    from nmperm_plugin.export.report import READY
    from nmperm_plugin.export.torchao import TorchaoExportConfig

    model = family_model(family)
    sidecar, _ = permute_(model, ids, _prune_config("ria", fold))
    model.save_pretrained(tmp_path)
    finish_sidecar(tmp_path, sidecar)
    with torch.no_grad():
        reference = model(ids).logits
    exported, report = export_checkpoint(tmp_path, TorchaoExportConfig(dtype="bf16", device="cpu"))
    assert report.missing == [] and report.ok
    ready = {layer.name for layer in report.layers if layer.status == READY}
    assert ready == set(sidecar.frames)  # every pruned weight, and only those
    with torch.no_grad():
        assert_same_function(exported(ids).logits.float(), reference, 2e-2)  # bfloat16


@pytest.mark.parametrize("family", ["mixtral", "gpt2"])
def test_modifier_with_apply_mask_prunes_and_saves_a_verified_checkpoint(family, tmp_path):
    """LearnedPermutationModifier (``apply_mask: true``, no stock pruner) on fused experts and Conv1D: the
    checkpoint it saves lists every expert slice and Conv1D as 2:4 and passes ``nmperm verify``."""
    from llmcompressor.core import State
    from torch.utils.data import DataLoader

    from nmperm_plugin.io.sidecar import Sidecar
    from nmperm_plugin.io.verify import verify_checkpoint
    from nmperm_plugin.llmcompressor.modifier import LearnedPermutationModifier

    model = family_model(family)
    rows = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(3))
    state = State()
    state.update(model=model, calib_data=DataLoader([{"input_ids": row} for row in rows], batch_size=2))
    modifier = LearnedPermutationModifier(apply_mask=True, objective="layerwise", steps_per_layer=1, block_size=16)
    modifier.initialize(state)
    model.save_pretrained(tmp_path)
    sites = get_adapter(model).sites(model, "exact")
    assert sorted(Sidecar.load(tmp_path).frames) == sorted(name for site in sites for name in site.linears)
    assert verify_checkpoint(tmp_path).ok
