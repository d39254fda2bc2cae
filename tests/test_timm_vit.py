"""timm's VisionTransformer (class-token and average pooling, LayerScale, register tokens, q/k norms):
folding keeps the logits (exact and gather), pruning from image batches gives 2:4 linears whose
checkpoint verifies, configurations no fold reproduces are refused by name.

timm needs torchvision, which imports only beside a newer torch than this project's environment
tests, so these tests run in an environment of their own (README, "timm tests"; .ci/run's second
stage, which sets NMPERM_OPTIONAL=timm,torchvision so that a missing timm fails there); elsewhere they
skip naming the missing module (tests/optional_deps.py states the rule)."""

import copy

import pytest
import torch
from conftest import assert_pruned_nm, assert_same_function, randomise_vectors_
from optional_deps import require
from test_architectures import exact_fold, gather_fold

from nmperm_plugin import PermuteConfig, permute_
from nmperm_plugin.core.ops import function_error
from nmperm_plugin.io.checkpoint import finish_sidecar
from nmperm_plugin.io.verify import verify_checksums, verify_model
from nmperm_plugin.learn.fold import GatherLinear, GatherNorm
from nmperm_plugin.plugins.registry import get_adapter

timm = require("timm", "see README: timm tests")
VisionTransformer = require("timm.models.vision_transformer").VisionTransformer

VARIANTS = {
    "token": {},
    "avg": dict(global_pool="avg", class_token=False),  # fc_norm after the pooling, no final norm
    "layerscale": dict(init_values=0.1),
    "avg-layerscale-registers": dict(global_pool="avg", init_values=0.1, reg_tokens=2, no_embed_class=True),
    "registers-qknorm-prenorm": dict(reg_tokens=2, qk_norm=True, pre_norm=True),  # norm_pre, no patch bias
}
FAST = dict(block_size=16, sequences_per_step=2, select_sequences=2, steps_per_layer=3, end_to_end_steps=3)
FAST |= dict(select_every=1)


pytestmark = pytest.mark.usefixtures("one_thread")  # many tiny matmuls: one thread is fastest


def timm_vit(variant: str = "token", seed: int = 0, **overrides) -> VisionTransformer:
    """A tiny random timm ViT (2 blocks, width 64, 4 heads of 16, MLP 128, 16x16 RGB images in 4x4
    patches, 10 classes) with every vector, token and position embedding randomised (LayerScale starts
    as a constant, the tokens near zero: a missing permutation would go unnoticed)."""
    torch.manual_seed(seed)
    kwargs = dict(img_size=16, patch_size=4, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0, num_classes=10)
    model = VisionTransformer(**(kwargs | VARIANTS[variant] | overrides)).eval()
    return randomise_vectors_(model, ("token", "pos_embed"))


def pixels(images) -> torch.Tensor:
    return torch.cat([batch["pixel_values"] for batch in images])


@torch.no_grad()
def logits(model, images) -> torch.Tensor:
    return model(pixels(images))


@pytest.mark.parametrize("variant", VARIANTS)
def test_exact_fold_preserves_logits(variant, images):
    model = timm_vit(variant)
    adapter = get_adapter(model)
    assert adapter.name == "timm_vit"
    sites = adapter.sites(model, "exact")
    assert {s.kind for s in sites} == {"hidden", "attn_out", "mlp_out"}
    assert next(s for s in sites if s.kind == "hidden").linears == tuple(
        f"blocks.{i}.{n}" for i in range(2) for n in ("attn.qkv", "mlp.fc1")
    )
    assert next(s for s in sites if s.kind == "attn_out").tied_heads == (0, 1, 2, 3)  # every head its own
    folded = exact_fold(model)
    assert not any(isinstance(m, (GatherNorm, GatherLinear)) for m in folded.modules())
    error = function_error(logits(model, images), logits(folded, images))
    print(f"{variant}: exact fold error {error:.2g}")
    assert error <= 1e-5, error
    before, after = dict(model.named_parameters()), dict(folded.named_parameters())
    unmoved = {n for n in before if torch.equal(before[n], after[n])}
    # the stream's start (patch projection, tokens, positions), every norm, LayerScale, the biases move
    assert all(n == "head.bias" or "q_norm" in n or "k_norm" in n for n in unmoved), sorted(unmoved)


@pytest.mark.parametrize("variant", VARIANTS)
def test_gather_preserves_logits(variant, images):
    model = timm_vit(variant)
    assert {s.kind for s in get_adapter(model).sites(model, "gather")} == {"attn_in", "attn_out", "mlp_in", "mlp_out"}
    gathered = gather_fold(model)
    assert sum(isinstance(m, GatherNorm) for m in gathered.modules()) == 4  # norm1, norm2 of 2 blocks
    assert sum(isinstance(m, GatherLinear) for m in gathered.modules()) == 2  # attn.proj
    error = function_error(logits(model, images), logits(gathered, images))
    print(f"{variant}: gather fold error {error:.2g}")
    assert error <= 1e-5, error


@pytest.mark.parametrize("variant", ["token", "avg-layerscale-registers"])
@torch.no_grad()
def test_head_maps_the_last_block_output_to_the_logits(variant, images):
    model = timm_vit(variant)
    adapter = get_adapter(model)
    last = []
    handle = adapter.decoder_layers(model)[-1].register_forward_hook(lambda m, a, out: last.append(out))
    expected = logits(model, images)
    handle.remove()
    assert_same_function(adapter.head(model)(last[0]), expected, 1e-6)


@pytest.mark.parametrize("forgotten", ["permute_channels_", "permute_norm_"])
def test_a_wrong_fold_is_caught(forgotten, images, monkeypatch):
    """Forgetting the tokens, positions and LayerScale gammas (or the norms) changes the logits."""
    import nmperm_plugin.arch.timm_vit as timm_vit_adapter

    model = timm_vit("avg-layerscale-registers")
    monkeypatch.setattr(timm_vit_adapter, forgotten, lambda *args: None)
    error = function_error(logits(model, images), logits(exact_fold(model), images))
    assert error > 1e-3, error


REFUSED = [
    (dict(global_pool="map"), "global_pool='map'"),
    (dict(num_classes=0), "num_classes=0"),
    (dict(mlp_layer=timm.layers.SwiGLU), "SwiGLU"),
    (dict(scale_mlp_norm=True), r"blocks\.0\.mlp\.norm \(LayerNorm\)"),
    (dict(scale_attn_norm=True), r"blocks\.0\.attn\.norm \(LayerNorm\)"),
    (dict(block_fn=timm.models.vision_transformer.ResPostBlock), "ResPostBlock"),
]


@pytest.mark.parametrize("overrides,named", REFUSED, ids=[named.split(" ")[0] for _, named in REFUSED])
def test_configurations_that_do_not_fold_are_refused(overrides, named, images):
    model = timm_vit(**overrides)
    with pytest.raises(ValueError, match=f"cannot fold permutations exactly into .*{named}.*Supported:"):
        get_adapter(model).sites(model, "exact")
    with pytest.raises(ValueError, match=named):
        permute_(model, images, PermuteConfig(**FAST))


def test_other_timm_models_are_not_taken_for_it():
    deit = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=16, patch_size=4, depth=1)
    with pytest.raises(ValueError, match="unsupported architecture 'VisionTransformerDistilled'"):
        get_adapter(deit)  # a subclass with a distillation token and head of its own


def test_create_model_gives_a_supported_model(images):
    kwargs = dict(pretrained=False, num_classes=10, img_size=16, patch_size=4, depth=2)
    model = timm.create_model("vit_tiny_patch16_224", **kwargs).eval()  # width 192: 3 heads of 64
    assert get_adapter(model).name == "timm_vit"
    assert_same_function(logits(exact_fold(model), images), logits(model, images))


def _config(method, fold, **kwargs):
    how = {"method": "learned", "objective": method.removeprefix("learned/")} if "/" in method else {"method": method}
    return PermuteConfig(**(FAST | how | {"fold": fold} | kwargs))


def verify(model, sidecar, directory) -> None:
    """The checks of ``nmperm verify`` on the model in memory (timm models have no ``save_pretrained``,
    which ``nmperm verify`` loads with) and the checksums of its weights saved as safetensors."""
    from safetensors.torch import save_file

    directory.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, directory / "model.safetensors")
    finish_sidecar(directory, sidecar, verify=False)
    report = verify_checksums(directory, sidecar, verify_model(model, sidecar))
    assert report.ok, report.render()
    assert len(sidecar.checksums) == 8


CASES = [
    ("token", "learned/end_to_end", "exact", True),
    ("avg-layerscale-registers", "learned/end_to_end", "exact", False),  # no labels: distils the dense logits
    ("layerscale", "learned/layerwise", "gather", True),
    ("avg", "ria", "exact", True),
]


@pytest.mark.parametrize("variant,method,fold,labelled", CASES)
def test_permute_images_prunes_to_nm_and_verifies(variant, method, fold, labelled, images, tmp_path):
    data = images if labelled else [{"pixel_values": batch["pixel_values"]} for batch in images]
    model = timm_vit(variant)
    permuted = copy.deepcopy(model)
    sidecar, _ = permute_(permuted, data, _config(method, fold, apply_mask=False))
    assert sidecar.verification["fold_relative_logit_error"] <= 1e-5
    assert_same_function(logits(permuted, images), logits(model, images))

    sidecar, result = permute_(model, data, _config(method, fold))
    assert sidecar.architecture == "timm_vit" and sidecar.method == method
    assert len(sidecar.frames) == 8  # qkv, proj, fc1, fc2 of both blocks
    if method == "learned/end_to_end":
        assert result.history["model"], "end_to_end learned nothing"
    verify(model, sidecar, tmp_path / "checkpoint")
    assert_pruned_nm(model, sidecar)
    assert torch.isfinite(logits(model, images)).all()
