"""Qwen2.5-VL and Qwen2-VL (the text decoder; the vision tower dense): folding keeps the logits with
and without images, pruning gives 2:4 linears of the decoder only, a saved checkpoint verifies."""

import copy

import pytest
import torch
from conftest import assert_pruned_nm, assert_same_function, verify_saved
from test_architectures import _prune_config as _config
from test_architectures import exact_fold, gather_fold
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

from nmperm_plugin import permute_
from nmperm_plugin.arch.qwen_vl import per_sample_images
from nmperm_plugin.fold import GatherLinear, GatherNorm
from nmperm_plugin.nm import NMPattern, is_nm
from nmperm_plugin.registry import get_adapter

VOCAB, IMAGE, VIDEO, START, END = 128, 120, 121, 122, 123
PATCH, TEMPORAL, MERGE = 4, 2, 2
GRID = (1, 4, 4)  # one frame of 4 x 4 patches (a 16 x 16 image): 4 image tokens after the 2 x 2 merge
FAMILIES = {
    "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration),
    "qwen2_vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration),
}


def vl_model(family: str, seed: int = 0):
    """A tiny random VL model: 2 vision blocks (hidden 64, 4 heads; Qwen2.5-VL: a windowed and a full
    attention block) and 2 text layers (hidden 64, 4 heads, 2 KV heads, MLP 128), every bias and norm
    weight randomised so that folding them is tested."""
    config_class, model_class = FAMILIES[family]
    vision = dict(depth=2, hidden_size=64, num_heads=4, patch_size=PATCH, temporal_patch_size=TEMPORAL)
    vision |= dict(spatial_merge_size=MERGE, in_channels=3)
    vision |= (
        dict(intermediate_size=128, out_hidden_size=64, window_size=16, fullatt_block_indexes=[1])
        if family == "qwen2_5_vl"
        else dict(embed_dim=64, mlp_ratio=2, hidden_size=64)
    )
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    text |= dict(num_key_value_heads=2, vocab_size=VOCAB, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    text |= dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    config = config_class(
        text_config=text, vision_config=vision, image_token_id=IMAGE, video_token_id=VIDEO,
        vision_start_token_id=START, vision_end_token_id=END,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 1:
                parameter.add_(torch.randn_like(parameter) * 0.2)
    return model


def image_batch(batch: int = 3, seed: int = 1) -> dict[str, torch.Tensor]:
    """``batch`` samples of 16 tokens with one image each (its 4 placeholder tokens at the same place),
    as a processor gives them (packed patches) and then :func:`per_sample_images` makes batch-first."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (batch, 16), generator=generator)
    ids[:, 3], ids[:, 4:8], ids[:, 8] = START, IMAGE, END
    patches = batch * GRID[0] * GRID[1] * GRID[2]
    packed = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "mm_token_type_ids": (ids == IMAGE).int(),  # 1 at image placeholders, as the processor marks them
        "pixel_values": torch.randn(patches, 3 * TEMPORAL * PATCH * PATCH, generator=generator),
        "image_grid_thw": torch.tensor([GRID] * batch),
    }
    return per_sample_images(packed)


def packed(batch: dict) -> dict:
    """The model's own inputs for a whole batch (patches of all images on one dimension)."""
    out = dict(batch)
    out["pixel_values"] = batch["pixel_values"].flatten(0, 1)
    out["image_grid_thw"] = batch["image_grid_thw"].flatten(0, 1)
    return out


@pytest.fixture
def images() -> list[dict]:
    return [image_batch(3, seed=1), image_batch(3, seed=2)]


@torch.no_grad()
def logits(model, batch: dict) -> torch.Tensor:
    return model(**packed(batch), use_cache=False).logits


def test_per_sample_images_and_model_inputs_round_trip():
    batch = image_batch(3)
    assert batch["pixel_values"].shape == (3, 16, 96) and batch["image_grid_thw"].shape == (3, 1, 3)
    adapter = get_adapter(vl_model("qwen2_5_vl"))
    sample = {k: v[1:2] for k, v in batch.items()}
    inputs = adapter.model_inputs(sample)
    assert inputs["pixel_values"].shape == (16, 96) and inputs["image_grid_thw"].tolist() == [list(GRID)]
    assert inputs["use_cache"] is False
    with pytest.raises(ValueError, match="give each sample the same"):
        per_sample_images({**packed(batch), "image_grid_thw": torch.tensor([GRID] * 4)})


@pytest.mark.parametrize("family", FAMILIES)
def test_sites_are_the_text_decoders(family):
    model = vl_model(family)
    adapter = get_adapter(model)
    assert adapter.name == "qwen_vl"
    for fold in ("exact", "gather"):
        names = [n for s in adapter.sites(model, fold) for n in s.linears]
        assert names and all(n.startswith("model.language_model.layers.") for n in names)
        assert len(set(names)) == 14  # q/k/v/o, gate/up/down of both text layers; no vision linear
    exact = {s.kind: s for s in adapter.sites(model, "exact")}
    assert exact["hidden"].channels == 64 and exact["attn_out"].tied_heads == (0, 0, 1, 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_exact_fold_preserves_logits_with_and_without_images(family, images):
    model = vl_model(family)
    folded = exact_fold(model)
    assert_same_function(logits(folded, images[0]), logits(model, images[0]))
    ids = images[0]["input_ids"].clamp_max(100)  # text only
    assert_same_function(folded(ids, use_cache=False).logits, model(ids, use_cache=False).logits)
    before, after = dict(model.named_parameters()), dict(folded.named_parameters())
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    assert "model.visual.merger.mlp.2.weight" in moved and "model.visual.merger.mlp.2.bias" in moved
    assert not any(n.startswith("model.visual.blocks.") for n in moved)  # the tower's blocks stay as they are


@pytest.mark.parametrize("family", FAMILIES)
def test_a_forgotten_merger_fold_is_caught(family, images, monkeypatch):
    model = vl_model(family)
    adapter = get_adapter(model)
    monkeypatch.setattr(type(adapter), "merger_out", "model.language_model.norm")  # any other stream vector
    folded = exact_fold(model)
    with pytest.raises(AssertionError, match="outputs differ"):
        assert_same_function(logits(folded, images[0]), logits(model, images[0]))


@pytest.mark.parametrize("family", FAMILIES)
def test_gather_preserves_logits(family, images):
    model = vl_model(family)
    gathered = gather_fold(model)
    assert sum(isinstance(m, GatherNorm) for m in gathered.modules()) == 4
    assert sum(isinstance(m, GatherLinear) for m in gathered.modules()) == 2
    assert_same_function(logits(gathered, images[0]), logits(model, images[0]))


@torch.no_grad()
def test_head_maps_the_last_layer_output_to_the_logits(images):
    model = vl_model("qwen2_5_vl")
    adapter = get_adapter(model)
    outputs = []
    handle = adapter.decoder_layers(model)[-1].register_forward_hook(lambda m, a, out: outputs.append(out))
    reference = logits(model, images[0])
    handle.remove()
    last = outputs[0][0] if isinstance(outputs[0], tuple) else outputs[0]
    assert_same_function(adapter.head(model)(last), reference, 1e-6)


CASES = [
    ("qwen2_5_vl", "learned/end_to_end", "exact", "images"),
    ("qwen2_5_vl", "ria", "exact", "images"),
    ("qwen2_5_vl", "ria", "gather", "images"),
    ("qwen2_5_vl", "learned/end_to_end", "exact", "ids"),
    ("qwen2_vl", "learned/end_to_end", "exact", "images"),
    ("qwen2_vl", "ria", "gather", "ids"),
]


@pytest.mark.parametrize("family,method,fold,data", CASES)
def test_permute_prunes_the_decoder_to_nm_and_checkpoint_verifies(family, method, fold, data, images, tmp_path, capsys):
    calibration = images if data == "images" else torch.cat([b["input_ids"] for b in images]).clamp_max(100)
    model = vl_model(family)
    dense = copy.deepcopy(model)
    permuted = copy.deepcopy(model)
    permute_(permuted, calibration, _config(method, fold, apply_mask=False))
    assert_same_function(logits(permuted, images[0]), logits(model, images[0]))

    sidecar, result = permute_(model, calibration, _config(method, fold))
    assert sidecar.architecture == "qwen_vl"
    assert len(sidecar.frames) == 14
    if method == "learned/end_to_end":
        assert result.history["model"], "end_to_end learned nothing"
    verify_saved(model, sidecar, tmp_path, capsys)
    assert_pruned_nm(model, sidecar)
    vision = {n: p for n, p in model.named_parameters() if n.startswith("model.visual.blocks.")}
    dense_vision = dict(dense.named_parameters())
    assert all(torch.equal(p, dense_vision[n]) for n, p in vision.items())  # the tower is left dense


def test_ignore_patterns_keep_chosen_decoder_linears_dense(images):
    model = vl_model("qwen2_5_vl")
    dense = copy.deepcopy(model)
    sidecar, _ = permute_(model, images, _config("ria", "exact", ignore=[r"layers\.0\.", r"mlp\.down_proj$"]))
    pruned = set(sidecar.frames)
    assert not any(".layers.0." in n or n.endswith("down_proj") for n in pruned) and len(pruned) == 6
    assert all(is_nm(model.get_submodule(n).weight, NMPattern(2, 4)) for n in pruned)  # layer 1 but down_proj
    for name in ("model.language_model.layers.0.self_attn.q_proj", "model.language_model.layers.1.mlp.down_proj"):
        kept, original = model.get_submodule(name).weight, dense.get_submodule(name).weight
        assert torch.equal(kept.flatten().sort().values, original.flatten().sort().values)  # reordered, none zeroed


def test_labels_are_the_text_tokens_only(images):
    adapter = get_adapter(vl_model("qwen2_5_vl"))
    sample = {k: v[:1] for k, v in images[0].items()}
    labels = adapter.labels(sample)
    placeholders = sample["input_ids"] == IMAGE
    assert (labels[placeholders] == -100).all() and torch.equal(
        labels[~placeholders], sample["input_ids"][~placeholders]
    )
    assert adapter.labels({"input_ids": sample["input_ids"]}) is not None  # text only: every next token
    assert torch.equal(adapter.labels(sample | {"labels": sample["input_ids"]}), sample["input_ids"])  # given: kept
