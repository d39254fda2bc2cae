"""Every recipe in recipes/ through stock ``llmcompressor.oneshot`` on a tiny saved Llama, offline."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_model
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers import Modifier, ModifierFactory
from torch import nn
from transformers import AutoModelForCausalLM

import nmperm_plugin  # noqa: F401 - registers LearnedPermutationModifier
from nmperm_plugin.core.nm import NMPattern, is_nm
from nmperm_plugin.io.models import load_checkpoint_model
from nmperm_plugin.io.sidecar import SIDECAR_NAME, Sidecar
from nmperm_plugin.io.verify import verify_checkpoint

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
PROBE = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(7))
SEEN: list[torch.Tensor] = []


class NMPermProbeModifier(Modifier):
    """Test probe: records the model's logits when the recipe is initialised, i.e. after the permutation
    modifier before it has folded its permutations and before any pruner or quantizer has run."""

    def on_initialize(self, state, **kwargs) -> bool:
        SEEN.append(_logits(state.model))
        return True


ModifierFactory.register("NMPermProbeModifier", NMPermProbeModifier)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer) -> Path:
    directory = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    tiny_model().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(PROBE, use_cache=False).logits.float().clone()


def _dataset(num: int = 8, length: int = 32) -> Dataset:
    ids = torch.randint(0, 300, (num, length), generator=torch.Generator().manual_seed(1))
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})


def _run(model_dir: Path, recipe, output_dir: Path | None = None, **kwargs) -> nn.Module:
    recipe = recipe if isinstance(recipe, str) else str(recipe)
    options = dict(num_calibration_samples=8, shuffle_calibration_samples=False) | kwargs
    out = None if output_dir is None else str(output_dir)
    return oneshot(
        model=str(model_dir), dataset=options.pop("dataset", _dataset()), recipe=recipe, output_dir=out, **options
    )


def _with_probe(path: Path, **changes) -> str:
    """The recipe with the probe inserted right after LearnedPermutationModifier (whose fields ``changes`` updates)."""
    recipe = yaml.safe_load(path.read_text())
    for stage in recipe.values():
        for group, modifiers in stage.items():
            if "LearnedPermutationModifier" in modifiers:
                modifiers["LearnedPermutationModifier"].update(changes)
                items = []
                for name, args in modifiers.items():
                    items.append((name, args))
                    if name == "LearnedPermutationModifier":
                        items.append(("NMPermProbeModifier", {}))
                stage[group] = dict(items)
    return yaml.safe_dump(recipe, sort_keys=False)


def _learned_args(path: Path) -> dict:
    recipe = yaml.safe_load(path.read_text())
    return next(g["LearnedPermutationModifier"] for s in recipe.values() for g in s.values())


def _targeted(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]


def _weight(model: nn.Module, name: str) -> torch.Tensor:
    return model.get_submodule(name).weight.detach().float()


def _recipe_text(**changes) -> str:
    recipe = yaml.safe_load((RECIPES[0].parent / "wanda-2of4-learned.yaml").read_text())
    recipe["sparsity_stage"]["sparsity_modifiers"]["LearnedPermutationModifier"].update(changes)
    return yaml.safe_dump(recipe, sort_keys=False)


def test_every_recipe_is_tested():
    names = {p.name for p in RECIPES}
    assert {
        "wanda-2of4-learned.yaml",
        "sparsegpt-2of4-learned.yaml",
        "wanda-4of8-learned.yaml",
        "magnitude-2of4-apply-mask.yaml",
        "wanda-2of4-learned-fp8-dynamic.yaml",
        "sparsegpt-2of4-learned-w8a8.yaml",
        "sparsegpt-2of4-learned-w4a16.yaml",
        "sparsegpt-2of4-learned-fp8-dynamic.yaml",
    } <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_through_oneshot(recipe, tiny_dir, tmp_path):
    original = _logits(AutoModelForCausalLM.from_pretrained(tiny_dir))
    pattern = NMPattern.parse(_learned_args(recipe)["pattern"])
    SEEN.clear()
    out = tmp_path / "out"
    model = _run(tiny_dir, _with_probe(recipe), out)
    sidecar = Sidecar.load(out)
    if _learned_args(recipe).get("apply_mask"):  # pruned by the modifier itself: probe its permute-only twin
        twin = _run(
            tiny_dir, _with_probe(recipe, apply_mask=False, reconstruct=False, distill_steps=0), tmp_path / "twin"
        )
        assert Sidecar.load(tmp_path / "twin").permutations == sidecar.permutations
        assert sidecar.verification["fold_relative_logit_error"] < 1e-5
        del twin
    assert float((SEEN[-1] - original).abs().max()) < 1e-5  # permuted and folded, not yet pruned
    in_memory = _logits(model)
    targeted = _targeted(model)
    assert all(is_nm(_weight(model, n), pattern) for n in targeted)
    assert float((_weight(model, "lm_head") == 0).float().mean()) < 0.01  # ignored: dense

    assert sidecar.pattern == str(pattern) and sidecar.fold == "exact"
    assert set(sidecar.frames) == set(targeted) and not sidecar.verification["not_nm"]
    quantization = json.loads((out / "config.json").read_text()).get("quantization_config") or {}
    assert not quantization.get("sparsity_config")  # vLLM refuses a declared 2:4 structure
    assert "LearnedPermutationModifier" in (out / "recipe.yaml").read_text()
    assert verify_checkpoint(out).ok

    if quantization.get("format") == "pack-quantized":  # int4 weight_packed: read back decompressed, as verify does
        reloaded = load_checkpoint_model(out)
    else:
        reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert float((_logits(reloaded) - in_memory).abs().max()) < 1e-5
    assert all(is_nm(_weight(reloaded, n), pattern) for n in targeted)


def test_fp8_checkpoint_is_compressed_tensors_fp8(tiny_dir, tmp_path):
    _run(tiny_dir, RECIPES[0].parent / "wanda-2of4-learned-fp8-dynamic.yaml", tmp_path / "out")
    quantization = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert quantization["quant_method"] == "compressed-tensors" and quantization["format"] == "float-quantized"
    group = quantization["config_groups"]["group_0"]
    assert group["weights"]["num_bits"] == 8 and group["input_activations"]["dynamic"]
    assert quantization["sparsity_config"] == {}


@pytest.mark.parametrize("name", ["wanda-2of4-learned.yaml"])  # the recipes where a pruner follows the modifier
def test_sequential_pipeline_gives_the_masks_of_the_independent_one(name, tiny_dir):
    """The modifier permutes at initialisation, before any pipeline runs, so in one shared sequential
    pass the pruner's statistics are already taken in the permuted channel order."""
    recipe = RECIPES[0].parent / name
    independent = _run(tiny_dir, recipe, pipeline="independent")
    sequential = _run(tiny_dir, recipe, pipeline="sequential")
    plain = _run(tiny_dir, yaml.safe_dump(_without_permutation(recipe)), pipeline="independent")
    differs_from_plain = False
    for name in _targeted(independent):
        a, b = _weight(independent, name), _weight(sequential, name)
        assert torch.equal(a == 0, b == 0), name
        assert torch.allclose(a, b, atol=1e-6), name
        differs_from_plain |= not torch.equal(a == 0, _weight(plain, name) == 0)
    assert differs_from_plain  # the permutation changed the masks: the comparison is not vacuous


def _without_permutation(path: Path) -> dict:
    recipe = yaml.safe_load(path.read_text())
    for stage in recipe.values():
        for group in stage.values():
            group.pop("LearnedPermutationModifier", None)
    return recipe


def test_permute_only_keeps_the_function(tiny_dir, tmp_path):
    recipe = yaml.safe_load((RECIPES[0].parent / "wanda-2of4-learned.yaml").read_text())
    recipe["sparsity_stage"]["sparsity_modifiers"].pop("WandaPruningModifier")
    recipe["sparsity_stage"]["sparsity_modifiers"]["LearnedPermutationModifier"]["apply_mask"] = False
    original = _logits(AutoModelForCausalLM.from_pretrained(tiny_dir))
    model = _run(tiny_dir, yaml.safe_dump(recipe), tmp_path / "out")
    assert float((_logits(model) - original).abs().max()) < 1e-5
    sidecar = Sidecar.load(tmp_path / "out")
    assert sidecar.permutations and not sidecar.frames and len(sidecar.verification["not_nm"]) == 14


@pytest.mark.parametrize(
    "change,field",
    [({"blok_size": 64}, "blok_size"), ({"fold": "gahter"}, "fold"), ({"scorer": "wandda"}, "scorer")],
)
def test_recipe_typo_names_the_field(change, field, tiny_dir):
    with pytest.raises(ValueError, match=field):
        _run(tiny_dir, _recipe_text(**change))


def test_gather_export_is_refused_without_consent(tiny_dir, tmp_path):
    recipe = yaml.safe_load((RECIPES[0].parent / "magnitude-2of4-apply-mask.yaml").read_text())
    recipe["sparsity_stage"]["sparsity_modifiers"]["LearnedPermutationModifier"]["fold"] = "gather"
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="fold 'gather'.*allow_gather_checkpoint"):
        _run(tiny_dir, yaml.safe_dump(recipe), out)
    assert not (out / "model.safetensors").exists() and not (out / SIDECAR_NAME).exists()


def test_gather_checkpoint_with_consent(tiny_dir, tmp_path):
    recipe = yaml.safe_load((RECIPES[0].parent / "magnitude-2of4-apply-mask.yaml").read_text())
    args = recipe["sparsity_stage"]["sparsity_modifiers"]["LearnedPermutationModifier"]
    args |= {"fold": "gather", "allow_gather_checkpoint": True}
    model = _run(tiny_dir, yaml.safe_dump(recipe), tmp_path / "out")
    sidecar = Sidecar.load(tmp_path / "out")
    assert sidecar.fold == "gather" and any(frame is not None for frame in sidecar.frames.values())
    assert verify_checkpoint(tmp_path / "out").ok  # N:M under the recorded permutations
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert float((_logits(reloaded) - _logits(model)).abs().max()) < 1e-5


@pytest.mark.parametrize(
    "recipe,message",
    [
        (
            {"WandaPruningModifier": {"sparsity": 0.5, "mask_structure": "2:4"}, "LearnedPermutationModifier": {}},
            "must come before WandaPruningModifier",
        ),
        (
            {
                "LearnedPermutationModifier": {"pattern": "2:4"},
                "WandaPruningModifier": {"sparsity": 0.5, "mask_structure": "4:8"},
            },
            "pattern 2:4 differs from WandaPruningModifier mask_structure 4:8",
        ),
        (
            {
                "LearnedPermutationModifier": {"fold": "gather", "apply_mask": True},
                "WandaPruningModifier": {"sparsity": 0.5, "mask_structure": "2:4"},
            },
            "fold 'gather' keeps weights in the original channel order",
        ),
        (
            {
                "LearnedPermutationModifier": {"apply_mask": True, "reconstruct": True},
                "SparseGPTModifier": {"sparsity": 0.5, "mask_structure": "2:4"},
            },
            "would choose masks of its own and undo both",
        ),
        (
            {
                "LearnedPermutationModifier": {"apply_mask": True},
                "GPTQModifier": {"scheme": "W4A16", "targets": ["Linear"], "ignore": ["lm_head"]},
            },
            "GPTQModifier after pruning loses the N:M pattern",
        ),
    ],
    ids=["order", "pattern", "gather-then-pruner", "reconstruct-then-pruner", "gptq-after-pruning"],
)
def test_inconsistent_recipes_are_refused(recipe, message, tiny_dir):
    text = yaml.safe_dump({"sparsity_stage": {"sparsity_modifiers": recipe}}, sort_keys=False)
    with pytest.raises(ValueError, match=message):
        _run(tiny_dir, text)


def test_no_calibration_data_is_refused(tiny_dir):
    with pytest.raises(ValueError, match="needs calibration data"):
        _run(tiny_dir, _recipe_text(), dataset=None)


# -- nmperm prune --recipe (nmperm_plugin.llmcompressor.recipe.run_recipe) -------------------------------------
def test_run_recipe_writes_a_verified_checkpoint(saved_model, tmp_path):
    from nmperm_plugin.llmcompressor.recipe import run_recipe

    model_dir, text = saved_model
    out = tmp_path / "pruned"
    recipe = RECIPES[0].parent / "wanda-2of4-learned.yaml"
    assert run_recipe(model_dir, text, recipe, out, num_samples=4, seq_len=32, overwrite=False, seed=0) == 0
    assert verify_checkpoint(out).ok and Sidecar.load(out).pattern == "2:4"
    assert (out / "recipe.yaml").exists() and (out / "tokenizer.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "pruned", "tiny-llama"]  # no staging left
    assert run_recipe(model_dir, text, recipe, out, num_samples=4, seq_len=32, overwrite=True, seed=0) == 0


def _no_work(*args, **kwargs):
    raise AssertionError("work started before the arguments were checked")


@pytest.mark.parametrize(
    "case,error",
    [("non-empty", FileExistsError), ("typo", ValueError), ("gather", ValueError), ("missing", FileNotFoundError)],
)
def test_run_recipe_refuses_before_any_work(case, error, tmp_path, monkeypatch):
    from nmperm_plugin.llmcompressor import recipe as recipe_cli

    monkeypatch.setattr(recipe_cli, "_model_directory", _no_work)
    out, recipe = tmp_path / "out", tmp_path / "recipe.yaml"
    recipe.write_text(_recipe_text())
    if case == "non-empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "typo":
        recipe.write_text(_recipe_text(blok_size=64))
    elif case == "gather":
        recipe.write_text(yaml.safe_dump(_only_learned(_recipe_text(fold="gather", apply_mask=True))))
    else:
        recipe = tmp_path / "absent.yaml"
    with pytest.raises(error) as raised:
        recipe_cli.run_recipe("model", "data.txt", recipe, out, 4, 32, overwrite=False, seed=0)
    expected = {"non-empty": "not empty", "typo": "blok_size", "gather": "allow_gather_checkpoint", "missing": "absent"}
    assert expected[case] in str(raised.value)
    assert case != "non-empty" or (out / "keep.txt").read_text() == "mine"


def _only_learned(text: str) -> dict:
    recipe = yaml.safe_load(text)
    recipe["sparsity_stage"]["sparsity_modifiers"].pop("WandaPruningModifier")
    return recipe


def test_the_flags_nmperm_prune_suggests_are_the_best_recipes_settings():
    from nmperm_plugin.cli.commands import build_parser
    from nmperm_plugin.cli.options import config_from_args
    from nmperm_plugin.cli.prune import BEST_QUALITY

    (best,) = [path for path in RECIPES if path.name == "sparsegpt-2of4-learned.yaml"]
    fields = yaml.safe_load(best.read_text())["sparsity_stage"]["sparsity_modifiers"]["LearnedPermutationModifier"]
    args = build_parser().parse_args(["prune", "m.gguf", "--dataset", "d", "--output", "out", *BEST_QUALITY.split()])
    config = config_from_args(args)
    fields.pop("ignore")  # llm-compressor's syntax for what the CLI's --ignore regexes say
    assert {name: getattr(config, name) for name in fields} == fields
