"""Vision transformers (ViT, DeiT, CLIP's vision tower) and calibration batches of model inputs:
folding keeps the outputs (exact and gather), pruning from image batches gives N:M linears and a
checkpoint that verifies, the end-to-end objective computes the classifier's own loss (a tower's:
its feature distillation), and token ids given as batches of dicts give the same run as the tensor."""

import copy

import pytest
import torch
from conftest import assert_pruned_nm, assert_same_function, randomise_vectors_, tiny_model, verify_saved
from test_architectures import exact_fold, gather_fold
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    DeiTConfig,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    ViTConfig,
    ViTForImageClassification,
)

from nmperm_plugin import PermuteConfig, permute_
from nmperm_plugin.arch.vit import ViTAdapter
from nmperm_plugin.cli.commands import main
from nmperm_plugin.core.ops import function_error
from nmperm_plugin.data.calibration import samples_of, stack_labels
from nmperm_plugin.io.sidecar import Sidecar
from nmperm_plugin.learn.fold import GatherLinear, GatherNorm
from nmperm_plugin.learn.layers import capture_layer_inputs
from nmperm_plugin.learn.learner import LazyWeights, Member
from nmperm_plugin.learn.losses import LayerStack, WindowObjective
from nmperm_plugin.learn.pipeline import make_run
from nmperm_plugin.plugins.registry import get_adapter

VISION = {
    "vit": (ViTConfig, ViTForImageClassification, "vit"),
    "deit": (DeiTConfig, DeiTForImageClassification, "deit"),
    "deit-teacher": (DeiTConfig, DeiTForImageClassificationWithTeacher, "deit"),
    "clip": (CLIPVisionConfig, CLIPVisionModel, "clip_vision"),
    "clip-projection": (CLIPVisionConfig, CLIPVisionModelWithProjection, "clip_vision_projection"),
}
CLASSIFIERS = ("vit", "deit", "deit-teacher")
FAST = dict(block_size=16, sequences_per_step=2, select_sequences=2, steps_per_layer=3, end_to_end_steps=3)
FAST |= dict(select_every=1)


def vision_model(family: str, seed: int = 0):
    """A tiny random model (2 layers, hidden 64, 4 heads, 16x16 RGB images in 4x4 patches; 10 classes,
    CLIP: 32-dimensional image embeddings) with every vector, token and position embedding
    randomised (DeiT starts them at zero, where a missing permutation would go unnoticed)."""
    config_class, model_class, _ = VISION[family]
    config = config_class(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        image_size=16, patch_size=4, num_channels=3,
        **({"num_labels": 10} if family in CLASSIFIERS else {"projection_dim": 32}),
    )  # fmt: skip
    torch.manual_seed(seed)
    model = model_class(config).eval()
    return randomise_vectors_(model, ("token", "position_embedding"))


def pixels(images):
    return torch.cat([batch["pixel_values"] for batch in images])


def outputs(model, images) -> torch.Tensor:
    """What folding must keep: the logits, CLIP's last hidden state or image embeddings."""
    return get_adapter(model).outputs(model(pixel_values=pixels(images)))


EXACT_SITES = {"hidden", "attn_out", "mlp_out"}


@pytest.mark.parametrize("family", VISION)
def test_exact_fold_preserves_outputs(family, images):
    model = vision_model(family)
    adapter = get_adapter(model)
    assert adapter.name == VISION[family][2]
    sites = adapter.sites(model, "exact")
    assert {s.kind for s in sites} == EXACT_SITES
    hidden = next(s for s in sites if s.kind == "hidden")
    assert hidden.fixed == (family == "clip")  # a bare CLIP tower's outputs are the residual stream itself
    assert next(s for s in sites if s.kind == "attn_out").tied_heads == (0, 1, 2, 3)  # every head its own
    folded = exact_fold(model)
    assert not any(isinstance(m, (GatherNorm, GatherLinear)) for m in folded.modules())
    assert_same_function(outputs(folded, images), outputs(model, images))
    if family == "clip":
        x = pixels(images)
        assert_same_function(folded(x).pooler_output, model(x).pooler_output)
        with pytest.raises(ValueError, match="cannot be permuted"):
            adapter.fold_exact(folded, hidden, torch.randperm(hidden.channels))
        return
    before, after = dict(model.named_parameters()), dict(folded.named_parameters())
    unmoved = {n for n in before if torch.equal(before[n], after[n])}
    # the stream's start (patch projection, tokens, positions), every norm and the value/output biases move
    assert all("q_proj" in n or "k_proj" in n or n.endswith("classifier.bias") for n in unmoved), sorted(unmoved)


@pytest.mark.parametrize("family", VISION)
def test_gather_preserves_outputs(family, images):
    model = vision_model(family)
    adapter = get_adapter(model)
    sites = adapter.sites(model, "gather")
    assert {s.kind for s in sites} == {"attn_in", "attn_out", "mlp_in", "mlp_out"}
    gathered = gather_fold(model)
    assert sum(isinstance(m, GatherNorm) for m in gathered.modules()) == 4  # the 2 norms of 2 layers
    assert sum(isinstance(m, GatherLinear) for m in gathered.modules()) == 2  # the attention output
    assert_same_function(outputs(gathered, images), outputs(model, images))


@pytest.mark.parametrize("family", VISION)
@torch.no_grad()
def test_head_maps_the_last_layer_output_to_the_outputs(family, images):
    model = vision_model(family)
    adapter = get_adapter(model)
    last = []
    handle = adapter.decoder_layers(model)[-1].register_forward_hook(lambda m, a, out: last.append(out))
    expected = outputs(model, images)
    handle.remove()
    assert_same_function(adapter.head(model)(last[0]), expected, 1e-6)  # DeiT with teacher: both heads' mean


@pytest.mark.parametrize("attribute,broken", [("tokens", ()), ("final_norms", ())])
def test_a_wrong_fold_is_caught(attribute, broken, images, monkeypatch):
    model = vision_model("deit")
    assert isinstance(get_adapter(model), ViTAdapter)
    monkeypatch.setattr(type(get_adapter(model)), attribute, broken)  # forget the tokens, the final norm
    folded = exact_fold(model)
    x = pixels(images)
    error = function_error(model(x).logits, folded(x).logits)
    assert error > 1e-3, error


def test_a_forgotten_clip_class_embedding_is_caught(images, monkeypatch):
    import nmperm_plugin.arch.clip as clip

    model = vision_model("clip-projection")
    monkeypatch.setattr(clip, "permute_channels_", lambda parameter, perm: None)
    error = function_error(outputs(model, images), outputs(exact_fold(model), images))
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
    ("clip", "learned/end_to_end", "exact", False),  # a tower: feature distillation
    ("clip", "ria", "gather", False),
    ("clip-projection", "learned/end_to_end", "exact", False),
]


@pytest.mark.parametrize("family,method,fold,labelled", CASES)
def test_permute_images_prunes_to_nm_and_checkpoint_verifies(family, method, fold, labelled, images, tmp_path, capsys):
    data = images if labelled else [{"pixel_values": batch["pixel_values"]} for batch in images]
    model = vision_model(family)
    permuted = copy.deepcopy(model)
    permute_(permuted, data, _config(method, fold, apply_mask=False))
    assert_same_function(outputs(permuted, images), outputs(model, images))

    sidecar, result = permute_(model, data, _config(method, fold))
    assert sidecar.architecture == VISION[family][2]
    assert sorted(sidecar.frames) == sorted(n for s in result.sites for n in s.linears)
    assert len(sidecar.frames) == 12  # q/k/v/o, fc1, fc2 of both layers: every linear of the encoder
    assert all(
        torch.equal(torch.tensor(result.perms[s.name]), torch.arange(s.channels)) for s in result.sites if s.fixed
    )
    if method == "learned/end_to_end":
        assert result.history["model"], "end_to_end learned nothing"
    verify_saved(model, sidecar, tmp_path, capsys)
    assert_pruned_nm(model, sidecar)


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


@pytest.mark.parametrize("family", ["clip", "clip-projection"])
def test_a_tower_without_labels_distils_its_features(family, images):
    model = vision_model(family)
    unlabelled = [{"pixel_values": batch["pixel_values"]} for batch in images]
    task, distill = _dense_terms(model, unlabelled)
    assert float(task) == 0.0 and float(distill) == 0.0  # dense weights: nothing to distil
    dense = get_adapter(model).head(model)(torch.ones(2, 17, 64))
    assert float(get_adapter(model).output_distillation(dense * 1.1, dense)) == pytest.approx(0.01, rel=1e-4)


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


@pytest.fixture
def saved_vit(tmp_path):
    """A tiny ViT saved with its image processor, an image folder (classes 0 to 2, four PNGs each)
    and the same images as a saved ``datasets`` folder."""
    from datasets import Dataset, Features, Image, Value
    from PIL import Image as PILImage
    from transformers import ViTImageProcessor

    model = vision_model("vit")
    model.save_pretrained(tmp_path / "vit")
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(tmp_path / "vit")
    generator = torch.Generator().manual_seed(2)
    files, labels = [], []
    for label in range(3):
        (tmp_path / "images" / str(label)).mkdir(parents=True)
        for index in range(4):
            pixels = torch.randint(0, 256, (20, 20, 3), generator=generator, dtype=torch.uint8).numpy()
            files.append(str(tmp_path / "images" / str(label) / f"{index}.png"))
            PILImage.fromarray(pixels).save(files[-1])
            labels.append(label)
    features = Features({"image": Image(), "label": Value("int64")})
    Dataset.from_dict({"image": files, "label": labels}, features=features).save_to_disk(tmp_path / "dataset")
    return tmp_path


@pytest.mark.parametrize("dataset", ["images", "dataset"])
def test_nmperm_prune_takes_an_image_dataset(saved_vit, dataset, capsys):
    from nmperm_plugin.data.images import is_image_dataset

    assert is_image_dataset(saved_vit / dataset) and not is_image_dataset(saved_vit / "vit")
    out = saved_vit / "out"
    flags = ["--num-samples", "8", "--block-size", "16", "--end-to-end-steps", "2", "--sequences-per-step", "2"]
    flags += ["--objective", "end_to_end", "--eval-dataset", str(saved_vit / dataset), "--eval-samples", "12"]
    assert (
        main(["prune", str(saved_vit / "vit"), "--dataset", str(saved_vit / dataset), "--output", str(out), *flags])
        == 0
    )
    sidecar = Sidecar.load(out)
    assert sidecar.architecture == "vit" and sidecar.method == "learned/end_to_end"
    assert 0.0 <= sidecar.figures["top1_accuracy"] <= 100.0
    assert (out / "preprocessor_config.json").is_file()  # the processor travels with the checkpoint
    capsys.readouterr()
    assert main(["verify", str(out)]) == 0


def test_image_folder_classes_must_be_the_models(saved_vit):
    from nmperm_plugin.data.images import load_images

    (saved_vit / "images" / "cat").mkdir()
    (saved_vit / "images" / "0" / "0.png").rename(saved_vit / "images" / "cat" / "0.png")
    with pytest.raises(ValueError, match="'cat' is neither one of the model's labels"):
        load_images(saved_vit / "images", {"LABEL_0": 0})
    assert load_images(saved_vit / "images", {"cat": 7}).labels[-1] == 7  # after 0, 1, 2: sorted names


def test_the_modifier_calibrates_on_image_batches_from_the_pipeline(images):
    from llmcompressor.core import State
    from torch.utils.data import DataLoader

    from nmperm_plugin.core.nm import NMPattern, is_nm
    from nmperm_plugin.llmcompressor.compress import calibration_data
    from nmperm_plugin.llmcompressor.modifier import LearnedPermutationModifier

    pairs = [pair for b in images for pair in zip(b["pixel_values"], b["labels"], strict=True)]
    rows = [{"pixel_values": p, "labels": y} for p, y in pairs]
    loader = DataLoader(rows, batch_size=2)  # as oneshot's calibration dataloader collates them
    assert len(calibration_data(loader, max_sequences=4)) == 4
    model = vision_model("vit")
    before = outputs(model, images)
    state = State()
    state.update(model=model, calib_data=loader)
    modifier = LearnedPermutationModifier(**FAST, objective="end_to_end")
    modifier.initialize(state)
    assert modifier.sidecar.method == "learned/end_to_end" and modifier.sidecar.permutations
    assert_same_function(outputs(model, images), before)  # folded, no mask applied
    pruned = LearnedPermutationModifier(**FAST, objective="end_to_end", apply_mask=True)
    other = vision_model("vit", seed=1)
    state.update(model=other)
    pruned.initialize(state)
    linears = [m for n, m in other.named_modules() if isinstance(m, torch.nn.Linear) and "classifier" not in n]
    assert len(linears) == 12 and all(is_nm(m.weight, NMPattern(2, 4)) for m in linears)
