"""The non-Llama decoder families (Gemma 2/3, Phi-3, OPT, Mixtral, Qwen2/3-MoE, GPT-2): folding keeps
the logits, pruning gives N:M linears, a saved checkpoint verifies, an unknown architecture is
refused by name."""

import copy
import json

import pytest
import torch
from conftest import FAMILIES, assert_same_function, family_model
from test_fold import random_perms

from nmperm_plugin import PermuteConfig, permute_
from nmperm_plugin.arch.gemma import GemmaAdapter
from nmperm_plugin.arch.phi3 import Phi3Adapter
from nmperm_plugin.cli.commands import main
from nmperm_plugin.core.nm import NMPattern, is_nm
from nmperm_plugin.core.ops import function_error
from nmperm_plugin.io.checkpoint import finish_sidecar
from nmperm_plugin.io.sidecar import Sidecar
from nmperm_plugin.learn.fold import GatherLinear, GatherNorm, apply_gather, fold_permutations_
from nmperm_plugin.plugins.registry import get_adapter

GATHER_FAMILIES = [f for f in FAMILIES if f != "opt-postnorm"]
ADAPTER = {"gemma2": "gemma", "gemma3_text": "gemma", "phi3": "phi3", "opt": "opt", "opt-projected": "opt"}
ADAPTER |= {
    "opt-postnorm": "opt",
    "mixtral": "mixtral",
    "qwen2_moe": "qwen_moe",
    "qwen3_moe": "qwen_moe",
    "gpt2": "gpt2",
}
FAST = dict(block_size=16, sequences_per_step=2, select_sequences=2, steps_per_layer=3, end_to_end_steps=3)
FAST |= dict(select_every=1)


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, 300, (6, 32), generator=torch.Generator().manual_seed(1))


def exact_fold(model, seed=0):
    adapter = get_adapter(model)
    sites = adapter.sites(model, "exact")
    folded = copy.deepcopy(model)
    fold_permutations_(folded, sites, random_perms(sites, torch.Generator().manual_seed(seed)), adapter)
    return folded


def gather_fold(model, seed=1):
    adapter = get_adapter(model)
    sites = adapter.sites(model, "gather")
    perms = random_perms(sites, torch.Generator().manual_seed(seed))
    frames = {name: site.name for site in sites for name in site.linears}
    sidecar = Sidecar("2:4", "wanda", "test", "gather", adapter.name, {k: v.tolist() for k, v in perms.items()}, frames)
    return apply_gather(copy.deepcopy(model), sidecar)


@pytest.mark.parametrize("family", FAMILIES)
def test_exact_fold_preserves_logits(family, ids):
    model = family_model(family)
    adapter = get_adapter(model)
    assert adapter.name == ADAPTER[family]
    sites = adapter.sites(model, "exact")
    assert {s.kind for s in sites} == {"hidden", "attn_out", "mlp_out"}
    hidden = next(s for s in sites if s.kind == "hidden")
    readers = [len(adapter.attn_in + adapter.mlp_readers(layer)) for layer in adapter.decoder_layers(model)]
    assert len(hidden.linears) == sum(readers)  # every pruned reader of the stream (experts' gate and up too)
    folded = exact_fold(model)
    assert not any(isinstance(m, (GatherNorm, GatherLinear)) for m in folded.modules())  # standard architecture
    assert_same_function(folded(ids).logits, model(ids).logits)
    before, after = dict(model.named_parameters()), dict(folded.named_parameters())
    moved = [n for n in before if not torch.equal(before[n], after[n])]
    # every norm weight and bias and every bias in the stream's or a site's order (not q/k rows, not q/k norms)
    vectors = [n for n, p in before.items() if p.ndim == 1 and not any(k in n for k in ("q_", "k_"))]
    assert set(vectors) <= set(moved), sorted(set(vectors) - set(moved))


@pytest.mark.parametrize("family", GATHER_FAMILIES)
def test_gather_preserves_logits(family, ids):
    model = family_model(family)
    sites = get_adapter(model).sites(model, "gather")
    assert {s.kind for s in sites} == {"attn_in", "attn_out", "mlp_in", "mlp_out"}
    assert all(s.tied_heads is None for s in sites)  # gather: free attention-output permutation
    gathered = gather_fold(model)
    assert sum(isinstance(m, GatherNorm) for m in gathered.modules()) == 4  # attention and MLP input, 2 layers
    assert sum(isinstance(m, GatherLinear) for m in gathered.modules()) == 2
    assert_same_function(gathered(ids).logits, model(ids).logits)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_head_maps_the_last_layer_output_to_the_logits(family, ids):
    model = family_model(family)
    adapter = get_adapter(model)
    outputs = []
    handle = adapter.decoder_layers(model)[-1].register_forward_hook(lambda m, a, out: outputs.append(out))
    logits = model(ids).logits
    handle.remove()
    last = outputs[0][0] if isinstance(outputs[0], tuple) else outputs[0]
    assert_same_function(adapter.head(model)(last), logits, 1e-6)  # soft-capping, final norm, project_out


def test_post_norm_opt_refuses_gather_only():
    model = family_model("opt-postnorm")
    with pytest.raises(ValueError, match="post-norm.*use fold='exact'"):
        get_adapter(model).sites(model, "gather")


def test_site_layouts():
    gemma = family_model("gemma2")
    attn = next(s for s in get_adapter(gemma).sites(gemma, "exact") if s.kind == "attn_out")
    assert attn.channels == 128 and attn.tied_heads == (0, 0, 1, 1) and attn.head_size == 32  # head_dim 32
    phi3 = family_model("phi3")
    sites = {s.kind: s for s in get_adapter(phi3).sites(phi3, "gather") if s.layer == 0}
    assert sites["attn_in"].linears == ("model.layers.0.self_attn.qkv_proj",)
    assert sites["mlp_in"].linears == ("model.layers.0.mlp.gate_up_proj",) and sites["mlp_out"].channels == 128
    opt = family_model("opt")
    sites = {s.kind: s for s in get_adapter(opt).sites(opt, "exact") if s.layer in (None, 1)}
    assert sites["mlp_out"].linears == ("model.decoder.layers.1.fc2",)
    assert sites["attn_out"].tied_heads == (0, 1, 2, 3)  # multi-head attention: every head its own


@pytest.mark.parametrize(
    "family,attribute,broken",
    [
        ("gemma2", "residual_norms", ()),  # the post-norms are on the residual stream
        ("gemma3_text", "mlp_norm", "post_attention_layernorm"),  # Gemma's MLP reads pre_feedforward_layernorm
        ("phi3", "value_offset", lambda self, model: 0),  # the value rows are the last third of qkv_proj
    ],
)
def test_a_wrong_fold_is_caught(family, attribute, broken, ids, monkeypatch):
    model = family_model(family)
    adapter = type(get_adapter(model))
    assert adapter in (GemmaAdapter, Phi3Adapter)
    monkeypatch.setattr(adapter, attribute, broken)
    error = function_error(model(ids).logits, exact_fold(model)(ids).logits)
    assert error > 1e-3, error


def _prune_config(method, fold, **kwargs):
    how = {"method": "learned", "objective": method.removeprefix("learned/")} if "/" in method else {"method": method}
    return PermuteConfig(**(FAST | how | {"fold": fold} | kwargs))


def _cases():
    methods = ("learned/layerwise", "learned/end_to_end", "ria")  # end_to_end: the layer stack and the head
    return [
        (f, m, fold)
        for f in FAMILIES
        for m in methods
        for fold in ("exact", "gather")
        if (fold == "exact" or f in GATHER_FAMILIES) and (m != "learned/end_to_end" or fold == "exact")
    ]


@pytest.mark.parametrize("family,method,fold", _cases())
def test_permute_prunes_to_nm_and_checkpoint_verifies(family, method, fold, ids, tmp_path, capsys):
    model = family_model(family)
    reference = model(ids).logits
    permuted = copy.deepcopy(model)
    permute_(permuted, ids, _prune_config(method, fold, apply_mask=False))
    assert_same_function(permuted(ids).logits, reference)

    sidecar, result = permute_(model, ids, _prune_config(method, fold))
    assert sidecar.architecture == ADAPTER[family]
    assert sorted(sidecar.frames) == sorted(n for s in result.sites for n in s.linears)
    model.save_pretrained(tmp_path)
    finish_sidecar(tmp_path, sidecar, verify=False)
    capsys.readouterr()
    assert main(["verify", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and any(c["check"].endswith("pruned linears are 2:4") and c["ok"] for c in report["checks"])

    if fold == "gather":
        apply_gather(model, sidecar)
    with get_adapter(model).linear_form(model):  # GPT-2's Conv1D, fused experts: [out, in] views
        for name in sidecar.frames:
            module = model.get_submodule(name)
            assert is_nm(getattr(module, "linear", module).weight, NMPattern(2, 4)), name


def test_verify_catches_a_broken_fused_weight(ids, tmp_path):
    model = family_model("phi3")
    sidecar, _ = permute_(model, ids, _prune_config("ria", "exact"))
    with torch.no_grad():
        model.model.layers[1].self_attn.qkv_proj.weight[-1, :4] = 1.0  # a full group of four in a value row
    model.save_pretrained(tmp_path)
    finish_sidecar(tmp_path, sidecar, verify=False)
    assert main(["verify", str(tmp_path)]) == 1


def test_layers_with_different_attention_inputs_get_their_own(ids):
    """Gemma 3's sliding and global layers (own masks, own rotary embeddings), Gemma 2 beyond its window:
    the layer-by-layer walk must run each layer as the model does (layers.capture_layer_inputs)."""
    from nmperm_plugin.learn.layers import capture_layer_inputs, run_layer
    from nmperm_plugin.learn.pipeline import make_run

    for family in ("gemma3_text", "gemma2"):
        model = family_model(family)
        run = make_run(model, ids, _prune_config("ria", "exact"))
        hidden, layer_kwargs = capture_layer_inputs(model, run.layers, ids)
        outputs = []
        handle = run.layers[-1].register_forward_hook(lambda m, a, out, kept=outputs: kept.append(out))
        with torch.no_grad():
            model(ids)
        handle.remove()
        expected = outputs[0][0] if isinstance(outputs[0], tuple) else outputs[0]
        first = hidden
        for layer, kwargs in zip(run.layers, layer_kwargs, strict=True):
            hidden = run_layer(layer, hidden, kwargs)
            first = run_layer(layer, first, layer_kwargs[0])
        assert_same_function(hidden, expected, 1e-6)
        assert function_error(expected, first) > 1e-3  # the first layer's mask and rotary embedding would be wrong


def test_unknown_architecture_names_the_families_and_the_hook():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(
        num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=50
    )
    model = GPTNeoXForCausalLM(config)
    with pytest.raises(ValueError) as error:
        get_adapter(model)
    message = str(error.value)
    assert "unsupported architecture 'gpt_neox'" in message
    families = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "opt", "mixtral", "qwen2_moe")
    for family in (*families, "qwen3_moe", "gpt2"):
        assert family in message, family
    assert "nmperm_architectures" in message and "DecoderAdapter" in message
