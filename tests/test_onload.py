"""Learning on another device than the one that stores the weights (issue 15, item 1): a model kept
on the CPU learns on a GPU one decoder layer at a time; llm-compressor's offloaded models are
undispatched for the run and dispatched again after it."""

import copy

import pytest
import torch
from conftest import assert_same_function, tiny_config, tiny_model
from transformers import AutoModelForCausalLM

from nmperm_plugin import PermuteConfig, permute_
from nmperm_plugin.plugins.registry import get_adapter
from nmperm_plugin.runtime.onload import call_on, execution_device, head_on, module_tensors, undispatched

FAST = dict(block_size=16, sequences_per_step=2, select_sequences=2, end_to_end_steps=3, select_every=1)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)")


def test_a_module_on_its_device_is_called_as_it_is():
    model = tiny_model()
    layer, device = model.model.layers[0], torch.device("cpu")
    assert module_tensors(layer, device) == {}  # nothing to copy
    hidden = torch.randn(2, 8, 64)
    kwargs = {"position_embeddings": model.model.rotary_emb(hidden, torch.arange(8)[None])}
    weight = {"mlp.down_proj.weight": torch.zeros_like(layer.mlp.down_proj.weight)}
    expected = torch.func.functional_call(layer, weight, (hidden,), kwargs)
    torch.testing.assert_close(call_on(layer, weight, (hidden,), kwargs, device), expected, rtol=0, atol=0)
    head = get_adapter(model).head(model)
    assert head_on(model, model.model.layers, head, device) is head


def test_execution_device_names_the_current_cuda_device_and_keeps_others():
    assert execution_device(None) is None
    assert execution_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        assert execution_device("cuda") == torch.device("cuda", torch.cuda.current_device())


def test_an_explicit_device_where_the_model_is_changes_nothing(input_ids):
    model = tiny_model()
    config = PermuteConfig(**FAST, objective="end_to_end")
    _, plain = permute_(copy.deepcopy(model), input_ids, config)
    _, explicit = permute_(copy.deepcopy(model), input_ids, config, device="cpu")
    assert {k: v.tolist() for k, v in plain.perms.items()} == {k: v.tolist() for k, v in explicit.perms.items()}


def test_a_model_dispatched_by_llm_compressor_is_undispatched_for_the_run_and_dispatched_again(input_ids):
    from compressed_tensors.offload import set_onload_device
    from compressed_tensors.offload.cache import OffloadCache

    model, probe = tiny_model(), input_ids[:2]
    with torch.no_grad():
        before = model(probe).logits
    set_onload_device(model, "cpu")  # what oneshot's sequential pipeline does with a CPU-loaded model
    with undispatched(model) as onload:
        assert onload == "cpu" or onload == torch.device("cpu")
        assert not any(isinstance(m._parameters, OffloadCache) for m in model.modules())
        permute_(model, input_ids, PermuteConfig(**FAST, apply_mask=False))  # learns, folds in place
    assert isinstance(model.model.layers[0].mlp.down_proj._parameters, OffloadCache)
    with torch.no_grad():
        assert_same_function(model(probe).logits, before)  # the folded weights are what is offloaded now


def test_weights_offloaded_to_disk_are_refused_with_what_to_do(tmp_path):
    from compressed_tensors.offload import offload_module

    model = tiny_model()
    offload_module(model.model.layers[0].mlp.down_proj, "cpu", "disk", offload_dir=str(tmp_path))
    with pytest.raises(ValueError, match="offloaded to disk.*load the model to the CPU"):
        undispatched(model)


def _medium_model():
    """Weights large beside one layer's activations: 8 layers of hidden 512 (about 100 MB)."""
    config = tiny_config("llama")
    config.hidden_size, config.intermediate_size, config.num_hidden_layers = 512, 1536, 8
    config.num_attention_heads, config.num_key_value_heads, config.vocab_size = 8, 4, 1000
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@cuda
def test_a_cpu_model_learns_on_the_gpu_like_a_gpu_model_with_a_fraction_of_its_memory():
    ids = torch.randint(0, 1000, (4, 64), generator=torch.Generator().manual_seed(0))
    config = PermuteConfig(**FAST, objective="end_to_end", layer_checkpointing="on", train_dtype="float32")
    on_gpu = copy.deepcopy(_medium_model()).cuda()
    _, expected = permute_(on_gpu, ids, config)
    model = _medium_model()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    _, onloaded = permute_(model, ids, config, device="cuda")
    peak = torch.cuda.max_memory_allocated() - base
    assert next(model.parameters()).device.type == "cpu"  # the weights never left the CPU
    same = sum(torch.equal(onloaded.perms[s], expected.perms[s]) for s in expected.perms)
    assert same >= 0.9 * len(expected.perms)  # GPU kernels are the same; only reduction order may differ
    assert peak < 0.6 * weights, f"peak {peak / 2**20:.0f} MiB for {weights / 2**20:.0f} MiB of weights"


def test_a_model_fits_a_device_when_its_weights_take_at_most_half_its_free_memory(monkeypatch):
    from nmperm_plugin.io import checks
    from nmperm_plugin.runtime.onload import fits_on

    model = tiny_model()
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers()
    )
    assert fits_on(model, torch.device("cpu"))  # already there
    other = torch.device("cuda", 0)
    monkeypatch.setattr(checks, "available_memory", lambda device: 2 * weights)
    assert fits_on(model, other)
    monkeypatch.setattr(checks, "available_memory", lambda device: 2 * weights - 1)
    assert not fits_on(model, other)
