"""Vision transformers (ViT, DeiT) and calibration batches of model inputs: folding keeps the logits
(exact and gather), pruning from image batches gives N:M linears and a checkpoint that verifies, the
end-to-end objective computes the classifier's own loss, and token ids given as batches of dicts
give the same run as the tensor."""

import copy
import json

import pytest
import torch
from conftest import assert_same_function, tiny_model
from test_architectures import exact_fold, gather_fold
from transformers import (
    DeiTConfig,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    ViTConfig,
    ViTForImageClassification,
)

from nmperm_plugin import PermuteConfig, permute_
from nmperm_plugin.arch.vit import ViTAdapter
from nmperm_plugin.calibration import samples_of, stack_labels
from nmperm_plugin.checkpoint import finish_sidecar
from nmperm_plugin.cli import main
from nmperm_plugin.fold import GatherLinear, GatherNorm, apply_gather
from nmperm_plugin.learn import LazyWeights, Member
from nmperm_plugin.nm import NMPattern, is_nm
from nmperm_plugin.objectives import LayerStack, WindowObjective
from nmperm_plugin.ops import function_error
from nmperm_plugin.pipeline import make_run
from nmperm_plugin.registry import get_adapter
from nmperm_plugin.run import capture_layer_inputs

VISION = {
    "vit": (ViTConfig, ViTForImageClassification, "vit"),
    "deit": (DeiTConfig, DeiTForImageClassification, "deit"),
    "deit-teacher": (DeiTConfig, DeiTForImageClassificationWithTeacher, "deit"),
}
FAST = dict(block_size=16, sequences_per_step=2, select_sequences=2, steps_per_layer=3, end_to_end_steps=3)
FAST |= dict(select_every=1)


def vision_model(family: str, seed: int = 0):
    """A tiny random classifier (2 layers, hidden 64, 4 heads, 16x16 RGB images in 4x4 patches, 10
    classes) with every vector, token and position embedding randomised (DeiT starts them at zero,
    where a missing permutation would go unnoticed)."""
    config_class, model_class, _ = VISION[family]
    config = config_class(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        image_size=16, patch_size=4, num_channels=3, num_labels=10,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim == 1 or "token" in name or "position_embeddings" in name:
                parameter.add_(torch.randn_like(parameter) * 0.2)
    return model


@pytest.fixture
def images() -> list[dict]:
    """Two batches of three images with class labels, as an image processor and a collator give them."""
    generator = torch.Generator().manual_seed(1)
    batch = lambda: {  # noqa: E731
        "pixel_values": torch.randn(3, 3, 16, 16, generator=generator),
        "labels": torch.randint(0, 10, (3,), generator=generator),
    }
    return [batch(), batch()]


def pixels(images):
    return torch.cat([batch["pixel_values"] for batch in images])


@pytest.mark.parametrize("family", VISION)
def test_exact_fold_preserves_logits(family, images):
    model = vision_model(family)
    adapter = get_adapter(model)
    assert adapter.name == VISION[family][2]
    sites = adapter.sites(model, "exact")
    assert {s.kind for s in sites} == {"hidden", "attn_out", "mlp_out"}
    assert next(s for s in sites if s.kind == "attn_out").tied_heads == (0, 1, 2, 3)  # every head its own
    folded = exact_fold(model)
    assert not any(isinstance(m, (GatherNorm, GatherLinear)) for m in folded.modules())
    x = pixels(images)
    assert_same_function(folded(x).logits, model(x).logits)
    before, after = dict(model.named_parameters()), dict(folded.named_parameters())
    unmoved = {n for n in before if torch.equal(before[n], after[n])}
    # the stream's start (patch projection, tokens, positions), every norm and the value/output biases move
    assert all("q_proj" in n or "k_proj" in n or n.endswith("classifier.bias") for n in unmoved), sorted(unmoved)


@pytest.mark.parametrize("family", VISION)
def test_gather_preserves_logits(family, images):
    model = vision_model(family)
    adapter = get_adapter(model)
    sites = adapter.sites(model, "gather")
    assert {s.kind for s in sites} == {"attn_in", "attn_out", "mlp_in", "mlp_out"}
    gathered = gather_fold(model)
    assert sum(isinstance(m, GatherNorm) for m in gathered.modules()) == 4  # layernorm_before/after, 2 layers
    assert sum(isinstance(m, GatherLinear) for m in gathered.modules()) == 2  # o_proj
    x = pixels(images)
    assert_same_function(gathered(x).logits, model(x).logits)


@pytest.mark.parametrize("family", VISION)
@torch.no_grad()
def test_head_maps_the_last_layer_output_to_the_logits(family, images):
    model = vision_model(family)
    adapter = get_adapter(model)
    outputs = []
    handle = adapter.decoder_layers(model)[-1].register_forward_hook(lambda m, a, out: outputs.append(out))
    logits = model(pixels(images)).logits
    handle.remove()
    assert_same_function(adapter.head(model)(outputs[0]), logits, 1e-6)  # DeiT with teacher: both heads' mean


@pytest.mark.parametrize("attribute,broken", [("tokens", ()), ("final_norms", ())])
def test_a_wrong_fold_is_caught(attribute, broken, images, monkeypatch):
    model = vision_model("deit")
    assert isinstance(get_adapter(model), ViTAdapter)
    monkeypatch.setattr(type(get_adapter(model)), attribute, broken)  # forget the tokens, the final norm
    folded = exact_fold(model)
    x = pixels(images)
    error = function_error(model(x).logits, folded(x).logits)
    assert error > 1e-3, error


def test_an_encoder_without_classifier_is_refused():
    config = ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=8, num_labels=0
    )
    model = ViTForImageClassification(config)
    with pytest.raises(ValueError, match="unsupported architecture 'vit'"):
        get_adapter(model)  # num_labels=0: an Identity head reads the residual stream itself


def _config(method, fold, **kwargs):
    how = {"method": "learned", "objective": method.removeprefix("learned/")} if "/" in method else {"method": method}
    return PermuteConfig(**(FAST | how | {"fold": fold} | kwargs))


CASES = [
    ("vit", "learned/end_to_end", "exact", True),
    ("vit", "learned/end_to_end", "exact", False),  # no labels: distillation of the dense logits
    ("vit", "ria", "exact", True),
    ("vit", "ria", "gather", True),
    ("vit", "learned/layerwise", "gather", False),
    ("deit", "learned/end_to_end", "exact", True),
    ("deit-teacher", "ria", "exact", False),
]


@pytest.mark.parametrize("family,method,fold,labelled", CASES)
def test_permute_images_prunes_to_nm_and_checkpoint_verifies(family, method, fold, labelled, images, tmp_path, capsys):
    data = images if labelled else [{"pixel_values": batch["pixel_values"]} for batch in images]
    model = vision_model(family)
    x = pixels(images)
    permuted = copy.deepcopy(model)
    permute_(permuted, data, _config(method, fold, apply_mask=False))
    assert_same_function(permuted(x).logits, model(x).logits)

    sidecar, result = permute_(model, data, _config(method, fold))
    assert sidecar.architecture == VISION[family][2]
    assert sorted(sidecar.frames) == sorted(n for s in result.sites for n in s.linears)
    if method == "learned/end_to_end":
        assert result.history["model"], "end_to_end learned nothing"
    model.save_pretrained(tmp_path)
    finish_sidecar(tmp_path, sidecar, verify=False)
    capsys.readouterr()
    assert main(["verify", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["checks"][0]["detail"] == type(model).__name__  # loaded as its own class
    if fold == "gather":
        apply_gather(model, sidecar)
    for name in sidecar.frames:
        module = model.get_submodule(name)
        assert is_nm(getattr(module, "linear", module).weight, NMPattern(2, 4)), name


def _dense_terms(model, data):
    model.requires_grad_(False)
    run = make_run(model, data, PermuteConfig(**FAST))
    hidden, kwargs = capture_layer_inputs(model, run.layers, run.samples)
    _, dense = run.dense_pass(hidden, kwargs, list(run.linears), keep_outputs=True)
    adapter = run.adapter
    stack = LayerStack(list(run.layers), run.layer_prefixes, kwargs, adapter.head(model), adapter.task_loss)
    objective = WindowObjective(stack, range(2), hidden, dense, run.labels, 0.1, 2, 6, torch.Generator())
    members = [Member(n + ".weight", lin.weight, lin.weight, run.site_of[n].name) for n, lin in run.linears.items()]
    weights = LazyWeights(members, lambda member: member.weight)
    return objective._terms(weights, torch.arange(6), train=False)


def test_end_to_end_computes_the_classifiers_own_loss(images):
    model = vision_model("vit")
    task, distill = _dense_terms(model, images)
    labels = torch.cat([batch["labels"] for batch in images])
    reference = model(pixels(images), labels=labels).loss
    torch.testing.assert_close(task, reference, rtol=1e-5, atol=0)
    assert float(distill) == 0.0
    task, distill = _dense_terms(model, [{"pixel_values": batch["pixel_values"]} for batch in images])
    assert float(task) == pytest.approx(0.0, abs=1e-6) and float(distill) == 0.0  # KL to itself


def test_token_id_batches_give_the_same_run_as_the_tensor(input_ids):
    """A causal LM's dict batches without labels learn the next token, as the tensor form does."""
    config = _config("learned/end_to_end", "exact")
    tensor_model, dict_model = tiny_model(), tiny_model()
    tensor_sidecar, tensor_result = permute_(tensor_model, input_ids, config)
    batches = [{"input_ids": input_ids[:4]}, {"input_ids": input_ids[4:]}]
    dict_sidecar, dict_result = permute_(dict_model, batches, config)
    assert dict_sidecar.permutations == tensor_sidecar.permutations
    assert dict_result.history == tensor_result.history
    for a, b in zip(tensor_model.parameters(), dict_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_calibration_batches_are_split_into_samples():
    samples = samples_of([{"pixel_values": torch.zeros(3, 1, 2, 2), "labels": [1, 2, 3], "extra": None}])
    assert len(samples) == 3 and samples[2]["pixel_values"].shape == (1, 1, 2, 2)
    assert samples[1]["labels"].tolist() == [2] and "extra" not in samples[0]
    assert stack_labels([s["labels"] for s in samples]).tolist() == [1, 2, 3]
    assert stack_labels([None, None]) is None
    with pytest.raises(ValueError, match="give all or none"):
        stack_labels([torch.tensor([1]), None])
    with pytest.raises(ValueError, match="one batch size"):
        samples_of([{"pixel_values": torch.zeros(3, 1, 2, 2), "labels": torch.tensor([1, 2])}])
    with pytest.raises(TypeError, match="not one dict"):
        samples_of({"pixel_values": torch.zeros(3, 1, 2, 2)})
    with pytest.raises(ValueError, match="no sample"):
        samples_of([])
    with pytest.raises(ValueError, match=r"non-empty \[num_sequences, seq_len\]"):
        samples_of(torch.zeros(0, 4, dtype=torch.long))
