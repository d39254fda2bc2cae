"""Qwen2.5-VL and Qwen2-VL: the text decoder (``permute_(model, ...)``; the vision tower dense), the
vision tower (``permute_(model.model.visual, ...)``) and both (``permute_parts_``): folding keeps the
logits with and without images, pruning gives 2:4 linears of the chosen parts only, a saved
checkpoint verifies."""

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

from nmperm_plugin import PermuteConfig, permute_
from nmperm_plugin.arch.qwen_vl import per_sample_images
from nmperm_plugin.core.nm import NMPattern, is_nm
from nmperm_plugin.core.ops import function_error
from nmperm_plugin.learn.fold import GatherLinear, GatherNorm
from nmperm_plugin.learn.layers import capture_layer_inputs, run_layer
from nmperm_plugin.learn.parts import merge_sidecars, permute_parts_
from nmperm_plugin.plugins.registry import get_adapter

VOCAB, IMAGE, VIDEO, START, END = 128, 120, 121, 122, 123
TOKENS = (IMAGE, VIDEO, START, END)
PATCH, TEMPORAL, MERGE = 4, 2, 2
GRID = (1, 4, 4)  # one frame of 4 x 4 patches (a 16 x 16 image): 4 image tokens after the 2 x 2 merge
FAMILIES = {
    "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration),
    "qwen2_vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration),
}


def vl_model(family: str, seed: int = 0, window_size: int = 16, vocab: int = VOCAB, tokens=TOKENS):
    """A tiny random VL model: 2 vision blocks (hidden 64, 4 heads; Qwen2.5-VL: a windowed and a full
    attention block, ``window_size`` pixels: 16 is the whole 16 x 16 image, 8 four windows of one merged
    token each) and 2 text layers (hidden 64, 4 heads, 2 KV heads, MLP 128), every bias and norm weight
    randomised so that folding them is tested. ``vocab`` tokens, ``tokens`` the ids of the image, video,
    vision start and end tokens."""
    config_class, model_class = FAMILIES[family]
    vision = dict(depth=2, hidden_size=64, num_heads=4, patch_size=PATCH, temporal_patch_size=TEMPORAL)
    vision |= dict(spatial_merge_size=MERGE, in_channels=3)
    vision |= (
        dict(intermediate_size=128, out_hidden_size=64, window_size=window_size, fullatt_block_indexes=[1])
        if family == "qwen2_5_vl"
        else dict(embed_dim=64, mlp_ratio=2, hidden_size=64)
    )
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    text |= dict(num_key_value_heads=2, vocab_size=vocab, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    text |= dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    config = config_class(text_config=text, vision_config=vision, **dict(zip(names, tokens, strict=True)))
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


# -- the vision tower -----------------------------------------------------------------------------
TOWER_LINEARS = {"qwen2_5_vl": 10, "qwen2_vl": 8}  # per block: qkv, proj and gate/up/down, or fc1/fc2


def tower(model):
    return model.model.visual


def with_tower(model, folded_tower):
    """A copy of ``model`` whose vision tower is ``folded_tower``."""
    copied = copy.deepcopy(model)
    copied.model.visual = folded_tower
    return copied


@pytest.mark.parametrize("family", FAMILIES)
def test_tower_sites(family):
    model = vl_model(family)
    adapter = get_adapter(tower(model))
    assert adapter.name == "qwen_vl_vision"
    exact = adapter.sites(tower(model), "exact")
    hidden = next(s for s in exact if s.kind == "hidden")
    mlp_in = ("mlp.gate_proj", "mlp.up_proj") if family == "qwen2_5_vl" else ("mlp.fc1",)
    assert hidden.linears == tuple(f"blocks.{i}.{n}" for i in range(2) for n in ("attn.qkv", *mlp_in))
    attn_out = [s for s in exact if s.kind == "attn_out"]
    assert [s.linears for s in attn_out] == [("blocks.0.attn.proj",), ("blocks.1.attn.proj",)]
    assert all(s.tied_heads == (0, 1, 2, 3) for s in attn_out)  # each head its own: no grouped-query attention
    mlp_out = "mlp.down_proj" if family == "qwen2_5_vl" else "mlp.fc2"
    assert [s.linears for s in exact if s.kind == "mlp_out"] == [(f"blocks.{i}.{mlp_out}",) for i in range(2)]
    gather = adapter.sites(tower(model), "gather")
    assert len(gather) == 8 and len({n for s in gather for n in s.linears}) == TOWER_LINEARS[family]
    serving = {s.name for s in get_adapter(model).serving_sites(model, "gather")}  # the whole model's names
    assert {"model.visual.blocks.1.attn_out", "model.language_model.layers.1.attn_out"} <= serving


@pytest.mark.parametrize("family", FAMILIES)
def test_tower_layer_walk_reproduces_the_tower(family, images):
    model = vl_model(family, window_size=8)  # Qwen2.5-VL: block 0 attends in 4 windows, block 1 over the image
    visual, adapter = tower(model), get_adapter(tower(model))
    samples = [adapter.model_inputs({k: v[i : i + 1] for k, v in images[0].items()}) for i in range(3)]
    with torch.no_grad():
        expected = [visual(**sample) for sample in samples]
    with adapter.linear_form(visual):
        hidden, kwargs = capture_layer_inputs(visual, adapter.decoder_layers(visual), samples)
        assert hidden.shape == (3, 16, 64)
        bounds = [k["cu_seqlens"].tolist() for k in kwargs]
        assert bounds == ([[0, 4, 8, 12, 16], [0, 16]] if family == "qwen2_5_vl" else [[0, 16], [0, 16]])
        for index, layer in enumerate(adapter.decoder_layers(visual)):
            hidden = run_layer(layer, hidden, kwargs[index])
        features = adapter.head(visual)(hidden)
    assert all("forward" not in vars(block) for block in visual.blocks)  # the blocks are themselves again
    for i, output in enumerate(expected):
        assert_same_function(hidden[i], output.last_hidden_state, 1e-6)  # three sequences, attending apart
        # the merger's features in the blocks' (window) order, the model's in the image's: the same tokens
        assert_same_function(features[i].sort(0).values, output.pooler_output.sort(0).values, 1e-6)


@pytest.mark.parametrize("fold", ["exact", "gather"])
@pytest.mark.parametrize("family", FAMILIES)
def test_tower_folds_keep_the_logits(family, fold, images):
    model = vl_model(family, window_size=8)
    folded = with_tower(model, (exact_fold if fold == "exact" else gather_fold)(tower(model)))
    error = function_error(logits(model, images[0]), logits(folded, images[0]))
    print(f"{family} tower {fold} fold: logits differ by {error:.2e} of their scale")
    assert_same_function(logits(folded, images[0]), logits(model, images[0]))
    if fold == "gather":
        assert sum(isinstance(m, GatherNorm) for m in folded.model.visual.modules()) == 4
        assert sum(isinstance(m, GatherLinear) for m in folded.model.visual.modules()) == 2
        return
    before, after = dict(model.named_parameters()), dict(folded.named_parameters())
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    ends = ("patch_embed.proj.weight", "merger.ln_q.weight", "merger.mlp.0.weight")
    assert {f"model.visual.{n}" for n in ends} <= moved
    assert not any(n.startswith(("model.visual.merger.mlp.2", "model.language_model.")) for n in moved)


TOWER_CASES = [
    ("qwen2_5_vl", "learned/end_to_end", "exact"),
    ("qwen2_5_vl", "ria", "gather"),
    ("qwen2_vl", "ria", "exact"),
    ("qwen2_vl", "learned/layerwise", "gather"),
]


@pytest.mark.parametrize("family,method,fold", TOWER_CASES)
def test_permute_prunes_the_tower_to_nm(family, method, fold, images):
    model = vl_model(family, window_size=8)
    permuted = copy.deepcopy(model)
    permute_(tower(permuted), images, _config(method, fold, apply_mask=False))
    assert_same_function(logits(permuted, images[0]), logits(model, images[0]))

    dense_text = {n: p.clone() for n, p in model.named_parameters() if n.startswith("model.language_model.")}
    sidecar, result = permute_(tower(model), images, _config(method, fold))
    assert sidecar.architecture == "qwen_vl_vision" and len(sidecar.frames) == TOWER_LINEARS[family]
    if method.startswith("learned"):
        assert result.history, "nothing learned"
    assert torch.isfinite(logits(model, images[0])).all()
    assert all(torch.equal(p, dense_text[n]) for n, p in model.named_parameters() if n in dense_text)
    assert_pruned_nm(tower(model), sidecar)


@pytest.mark.parametrize("family,fold", [("qwen2_5_vl", "exact"), ("qwen2_5_vl", "gather"), ("qwen2_vl", "exact")])
def test_permute_parts_prunes_tower_and_text(family, fold, images, tmp_path, capsys):
    model = vl_model(family, window_size=8)
    permuted = copy.deepcopy(model)
    permute_parts_(permuted, images, _config("ria", fold, apply_mask=False), parts=("vision", "text"))
    assert_same_function(logits(permuted, images[0]), logits(model, images[0]))  # both parts' folds at once

    sidecar, results = permute_parts_(model, images, _config("ria", fold), parts=("vision", "text"))
    assert set(results) == {"vision", "text"} and sidecar.architecture == "qwen_vl"
    vision = [n for n in sidecar.frames if n.startswith("model.visual.blocks.")]
    text = [n for n in sidecar.frames if n.startswith("model.language_model.layers.")]
    assert len(vision) == TOWER_LINEARS[family] and len(text) == 14 and len(sidecar.frames) == len(vision) + 14
    assert "vision_tower" in sidecar.figures and "vision_tower" in sidecar.verification
    assert torch.isfinite(logits(model, images[0])).all()
    verify_saved(model, sidecar, tmp_path, capsys)
    assert_pruned_nm(model, sidecar)  # gather: the tower's gathers and the decoder's, from one sidecar


def test_permute_parts_ignore_patterns_match_the_models_names(images):
    model = vl_model("qwen2_5_vl", window_size=8)
    dense = copy.deepcopy(model)
    ignore = [r"model\.visual\.blocks\.0\.", r"language_model\.layers\.1\.", r"attn\.proj$"]
    sidecar, _ = permute_parts_(model, images, _config("ria", "exact", ignore=ignore), parts=("vision", "text"))
    pruned = set(sidecar.frames)
    assert {n.split(".layers.")[0].split(".blocks.")[0] for n in pruned} == {"model.visual", "model.language_model"}
    assert not any(".blocks.0." in n or ".layers.1." in n or n.endswith("attn.proj") for n in pruned)
    assert len(pruned) == 4 + 7  # tower block 1 but its proj; text layer 0
    assert all(is_nm(model.get_submodule(n).weight, NMPattern(2, 4)) for n in pruned)
    for name in ("model.visual.blocks.0.mlp.down_proj", "model.visual.blocks.1.attn.proj"):
        kept, original = model.get_submodule(name).weight, dense.get_submodule(name).weight
        assert torch.equal(kept.flatten().sort().values, original.flatten().sort().values)  # reordered, none zeroed

    text_only, _ = permute_parts_(copy.deepcopy(dense), images, _config("ria", "exact"))  # the default: the paper's
    assert len(text_only.frames) == 14 and not any(n.startswith("model.visual.") for n in text_only.frames)


def test_unsupported_calls_are_refused_clearly(images):
    model = vl_model("qwen2_vl")
    ids = images[0]["input_ids"].clamp_max(100)
    with pytest.raises(ValueError, match="choose one or both of 'vision', 'text'"):
        permute_parts_(model, images, PermuteConfig(), parts=("vision", "audio"))
    with pytest.raises(ValueError, match="choose one or both"):
        permute_parts_(model, images, PermuteConfig(), parts=())
    with pytest.raises(ValueError, match="takes a Qwen2.5-VL or Qwen2-VL model .a Qwen2VisionTransformer"):
        permute_parts_(tower(model), images, PermuteConfig(), parts=("vision",))
    with pytest.raises(ValueError, match="the vision tower calibrates on images: each batch needs pixel_values"):
        permute_parts_(model, ids, PermuteConfig(), parts=("vision", "text"))
    text, _ = permute_parts_(copy.deepcopy(model), images, _config("ria", "exact"))
    vision, _ = permute_parts_(copy.deepcopy(model), images, _config("ria", "gather"), parts=("vision",))
    assert vision.architecture == "qwen_vl" and all(n.startswith("model.visual.") for n in vision.frames)
    with pytest.raises(ValueError, match="differ in fold"):
        merge_sidecars(vision, text)


# -- LearnedPermutationModifier(parts=...) ---------------------------------------------------------
def _rows(batches: list[dict]) -> list[dict]:
    """The batches' samples as a dataset's rows (every tensor without its batch dimension)."""
    return [{k: v[i] for k, v in batch.items()} for batch in batches for i in range(len(batch["input_ids"]))]


def _modifier_state(model, batches: list[dict]):
    """A session state holding ``model`` and a dataloader of the image batches' samples, as ``oneshot``
    prepares it with a collator that stacks them."""
    from llmcompressor.core import State
    from torch.utils.data import DataLoader

    state = State()
    state.update(model=model, calib_data=DataLoader(_rows(batches), batch_size=2))
    return state


def test_the_parts_field_is_typed_and_validated():
    from pydantic import ValidationError

    from nmperm_plugin.llmcompressor.modifier import LearnedPermutationModifier

    assert LearnedPermutationModifier().parts == ["text"]
    assert LearnedPermutationModifier(parts=["text", "vision"]).parts == ["vision", "text"]  # the order they run in
    assert LearnedPermutationModifier(parts="text, vision").parts == ["vision", "text"]
    for bad, message in ((["audio"], "Input should be 'vision' or 'text'"), ([], "choose one or both")):
        with pytest.raises(ValidationError, match=message) as raised:
            LearnedPermutationModifier(parts=bad)
        assert "parts" in str(raised.value)


def test_the_modifier_keeps_the_images_of_vl_batches(images):
    from nmperm_plugin.llmcompressor.compress import calibration_data

    state = _modifier_state(vl_model("qwen2_5_vl"), images)
    samples = calibration_data(state.data.calib, max_sequences=4)
    assert len(samples) == 4 and samples[0]["pixel_values"].shape == (1, 16, 96)
    assert samples[0]["image_grid_thw"].tolist() == [[list(GRID)]]


def test_oneshot_prunes_the_chosen_parts_with_ignore_patterns(images, tmp_path, tokenizer, one_thread, capsys):
    """Stock ``llmcompressor.oneshot`` on a saved tiny Qwen2.5-VL with a dataset of image samples and a
    collator that stacks them: the tower's block 0 and ``lm_head`` ignored by llm-compressor regexes."""
    import yaml
    from datasets import Dataset
    from llmcompressor import oneshot

    import nmperm_plugin  # noqa: F401 - registers LearnedPermutationModifier
    from nmperm_plugin.io.sidecar import Sidecar

    vl_model("qwen2_5_vl", window_size=8).save_pretrained(tmp_path / "vl")
    tokenizer.save_pretrained(tmp_path / "vl")
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "vl")  # oneshot reads its saved path
    dense = copy.deepcopy(model)
    rows = _rows(images)
    dataset = Dataset.from_dict({k: [row[k].tolist() for row in rows] for k in rows[0]})
    fields = dict(method="ria", apply_mask=True, block_size=16, parts=["vision", "text"])
    fields["ignore"] = ["re:.*lm_head", r"re:model\.visual\.blocks\.0\..*"]
    recipe = {"sparsity_stage": {"sparsity_modifiers": {"LearnedPermutationModifier": fields}}}
    oneshot(
        model=model,
        processor=tokenizer,
        dataset=dataset,
        recipe=yaml.safe_dump(recipe),
        data_collator=lambda batch: {k: torch.tensor([row[k] for row in batch]) for k in batch[0]},
        batch_size=2,
        num_calibration_samples=len(rows),
        shuffle_calibration_samples=False,
        output_dir=str(tmp_path / "out"),
    )
    sidecar = Sidecar.load(tmp_path / "out")
    tower = sorted(n for n in sidecar.frames if n.startswith("model.visual."))
    assert tower == [
        f"model.visual.blocks.1.{n}" for n in ("attn.proj", "attn.qkv", "mlp.down_proj", "mlp.gate_proj", "mlp.up_proj")
    ]
    assert len(sidecar.frames) == 5 + 14 and "model.visual.hidden" in sidecar.permutations
    kept, original = model.model.visual.blocks[0].attn.qkv.weight, dense.model.visual.blocks[0].attn.qkv.weight
    assert torch.equal(kept.flatten().sort().values, original.flatten().sort().values)  # permuted, not pruned
    capsys.readouterr()
    from nmperm_plugin.cli.commands import main

    assert main(["verify", str(tmp_path / "out")]) == 0


def test_the_modifier_refuses_vision_without_a_tower_or_images():
    from conftest import tiny_model
    from test_modifier import _state

    from nmperm_plugin.llmcompressor.modifier import LearnedPermutationModifier

    with pytest.raises(ValueError, match=r"parts vision: a LlamaForCausalLM model has no vision tower .*leave parts"):
        LearnedPermutationModifier(parts=["vision"], method="ria", block_size=16).initialize(_state(tiny_model()))
    text_only = _state(vl_model("qwen2_vl"))  # token ids, no images
    with pytest.raises(ValueError, match="the calibration dataloader gives token ids only: pass oneshot a dataset"):
        LearnedPermutationModifier(parts=["vision", "text"], method="ria", block_size=16).initialize(text_only)


def test_the_modifier_resumes_both_parts_from_one_learning_state(images, tmp_path, monkeypatch, one_thread):
    """Killed in the text decoder's learning (the tower's finished), the same setup resumes and ends with
    the permutations of an uninterrupted run; a text-only run's state is refused by a run over both."""
    from test_resume import Interrupted, _interrupt_after

    from nmperm_plugin.learn import losses as objectives
    from nmperm_plugin.llmcompressor.modifier import LearnedPermutationModifier
    from nmperm_plugin.runtime import resume

    state_dir = tmp_path / "out.nmperm-state"
    fields = dict(block_size=16, sequences_per_step=2, select_sequences=2, select_every=2, end_to_end_steps=7)
    fields |= dict(objective="end_to_end", parts=["vision", "text"])

    def run(learning_state=None, **changes):
        modifier = LearnedPermutationModifier(**(fields | changes), learning_state=learning_state)
        model = vl_model("qwen2_5_vl", window_size=8)
        modifier.initialize(_modifier_state(model, images))
        return {k: v.tolist() for k, v in modifier.result.perms.items()}

    expected = run()
    assert {"model.visual.hidden", "hidden"} <= set(expected)  # both parts, in the model's names
    with monkeypatch.context() as patch:
        _interrupt_after(patch, objectives.WindowObjective, 7 + 6)  # the tower's 7 steps, then the text's 6th
        with pytest.raises(Interrupted):
            run(str(state_dir))
    assert len(list(state_dir.glob("phase-*.pt"))) == 1 and (state_dir / "current.pt").exists()
    with pytest.raises(resume.ResumeMismatchError, match=r"parts \['vision', 'text'\] there, \['text'\] now"):
        run(str(state_dir), parts=["text"])
    with monkeypatch.context() as patch:
        counter = _interrupt_after(patch, objectives.WindowObjective, 10**6)
        resumed = run(str(state_dir))
    assert resumed == expected and counter[0] == 2  # the text's steps 6 and 7 only
