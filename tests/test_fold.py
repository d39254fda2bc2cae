"""Folding keeps the function: logits agree to 1e-5 of their scale (fp32), for every family and mode."""

import copy

import pytest
import torch
from conftest import assert_same_function, tiny_model, unsupported_model

from nmperm_plugin.core.ops import tied_head_perm
from nmperm_plugin.io.sidecar import Sidecar
from nmperm_plugin.learn.fold import GatherLinear, GatherNorm, apply_gather, fold_permutations_
from nmperm_plugin.plugins.registry import get_adapter

CASES = [
    ("llama", 2, False),
    ("llama", 4, True),  # multi-head attention, tied embeddings
    ("mistral", 1, False),
    ("qwen2", 2, True),  # attention bias
    ("qwen3", 2, False),  # q/k norms
]


def random_perms(sites, generator):
    perms = {}
    for site in sites:
        if site.fixed:  # the identity, by definition
            perms[site.name] = torch.arange(site.channels)
        elif site.tied_heads is None:
            perms[site.name] = torch.randperm(site.channels, generator=generator)
        else:
            groups = max(site.tied_heads) + 1
            within = torch.stack([torch.randperm(site.head_size, generator=generator) for _ in range(groups)])
            perms[site.name] = tied_head_perm(site.tied_heads, within)
    return perms


@pytest.mark.parametrize("family,kv_heads,tied", CASES)
def test_exact_fold_preserves_logits(family, kv_heads, tied, input_ids):
    model = tiny_model(family, kv_heads, tied)
    reference = model(input_ids).logits
    adapter = get_adapter(model)
    sites = adapter.sites(model, "exact")
    assert {s.kind for s in sites} == {"hidden", "attn_out", "mlp_out"}
    folded = copy.deepcopy(model)
    fold_permutations_(folded, sites, random_perms(sites, torch.Generator().manual_seed(0)), adapter)
    assert type(folded.model.norm) is type(model.model.norm)  # standard architecture
    assert_same_function(folded(input_ids).logits, reference)
    changed = (folded.model.layers[0].mlp.down_proj.weight != model.model.layers[0].mlp.down_proj.weight).any()
    assert changed  # the weights really moved


@pytest.mark.parametrize("family,kv_heads,tied", CASES)
def test_gather_preserves_logits(family, kv_heads, tied, input_ids):
    model = tiny_model(family, kv_heads, tied)
    reference = model(input_ids).logits
    adapter = get_adapter(model)
    sites = adapter.sites(model, "gather")
    assert {s.kind for s in sites} == {"attn_in", "attn_out", "mlp_in", "mlp_out"}
    assert all(s.tied_heads is None for s in sites)  # gather: free o_proj permutation
    perms = random_perms(sites, torch.Generator().manual_seed(1))
    frames = {name: site.name for site in sites for name in site.linears}
    sidecar = Sidecar("2:4", "wanda", "test", "gather", "llama", {k: v.tolist() for k, v in perms.items()}, frames)
    gathered = apply_gather(copy.deepcopy(model), sidecar)
    assert isinstance(gathered.model.layers[0].input_layernorm, GatherNorm)
    assert isinstance(gathered.model.layers[0].self_attn.o_proj, GatherLinear)
    assert_same_function(gathered(input_ids).logits, reference)


def test_exact_attn_out_is_per_kv_head():
    model = tiny_model("llama", kv_heads=2)
    site = next(s for s in get_adapter(model).sites(model, "exact") if s.kind == "attn_out")
    assert site.tied_heads == (0, 0, 1, 1) and site.head_size == 16


def test_unsupported_architecture_is_named():
    with pytest.raises(ValueError, match=r"unsupported architecture 'gpt_neox'.*llama.*nmperm_architectures"):
        get_adapter(unsupported_model())
