"""LearnedPermutationModifier: fields and validation, registration, calibration data, the save hook."""

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from llmcompressor.core import State  # a hard dependency: never skipped
from llmcompressor.modifiers import ModifierFactory
from llmcompressor.recipe import Recipe
from pydantic import ValidationError
from torch.utils.data import DataLoader

import nmperm_plugin
from nmperm_plugin.core.nm import NMPattern, is_nm
from nmperm_plugin.io.sidecar import SIDECAR_NAME, Sidecar
from nmperm_plugin.learn.pipeline import strategy_of
from nmperm_plugin.llmcompressor.compress import calibration_ids, ignored_linears, sidecar_of, strip_sparsity_config
from nmperm_plugin.llmcompressor.modifier import LearnedPermutationModifier

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


pytestmark = pytest.mark.usefixtures("one_thread")


def test_import_registers_the_modifier():
    assert nmperm_plugin.LearnedPermutationModifier is LearnedPermutationModifier
    assert ModifierFactory._registered_registry["LearnedPermutationModifier"] is LearnedPermutationModifier


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipes_parse_and_round_trip(path):
    recipe = Recipe.create_instance(str(path))
    mine = [m for m in recipe.modifiers if isinstance(m, LearnedPermutationModifier)]
    assert len(mine) == 1 and recipe.modifiers[0] is mine[0]
    again = Recipe.create_instance(recipe.yaml())  # the recipe.yaml saved beside a checkpoint loads back
    assert next(m for m in again.modifiers if isinstance(m, LearnedPermutationModifier)) == mine[0]


@pytest.mark.parametrize(
    "fields,named",
    [
        ({"blok_size": 64}, "blok_size"),
        ({"pattern": "2-4"}, "pattern"),
        ({"scorer": "wandda"}, "scorer"),
        ({"method": "best"}, "method"),
        ({"init": "none"}, "init"),
        ({"objective": "global"}, "objective"),
        ({"fold": "gahter"}, "fold"),
        ({"train_dtype": "half"}, "train_dtype"),
        ({"block_size": 0}, "block_size"),
        ({"block_size": 6}, "block_size"),
        ({"epochs": 0}, "epochs"),
        ({"epochs": 2, "steps_per_layer": 3}, "epochs or steps_per_layer"),
        ({"end_to_end_steps": -1}, "end_to_end_steps"),
        ({"lr": -1.0}, "lr"),
        ({"apply_mask": "sometimes"}, "apply_mask"),
        ({"fold": "gather"}, "apply_mask: true"),
        ({"ignore": "lm_head"}, "ignore"),
    ],
)
def test_bad_fields_are_validation_errors_that_name_the_field(fields, named):
    with pytest.raises(ValidationError) as raised:
        LearnedPermutationModifier(**fields)
    assert named in str(raised.value)


def test_epochs_map_onto_learner_steps():
    assert LearnedPermutationModifier(epochs=2, sequences_per_step=4).epoch_steps(8) == 4
    assert LearnedPermutationModifier(epochs=1, sequences_per_step=4).epoch_steps(10) == 3
    assert LearnedPermutationModifier(epochs=3, sequences_per_step=4).epoch_steps(2) == 3  # one step per epoch
    assert LearnedPermutationModifier().epoch_steps(100) is None  # the objective's default
    config = LearnedPermutationModifier(epochs=2, sequences_per_step=4).permute_config(num_sequences=8)
    assert (config.steps_per_layer, config.total_steps) == (4, 4)


@pytest.mark.parametrize(
    ("objective", "fold", "described"),
    [
        ("layerwise", "exact", "20 steps per decoder layer"),
        ("end_to_end", "exact", "80 steps in all"),
        ("end_to_end", "gather", "120 steps in all"),
        ("staged", "gather", "20 steps per decoder layer, then end_to_end, 120 steps in all"),
    ],
)
def test_without_steps_or_epochs_the_objective_default_applies(objective, fold, described):
    config = LearnedPermutationModifier(objective=objective, fold=fold, apply_mask=True).permute_config(8)
    assert described in strategy_of(config).describe(config)


def test_fields_map_onto_permute_config():
    modifier = LearnedPermutationModifier(
        pattern="4:8", scorer="ria", objective="retained", block_size=32, epochs=1, sequences_per_step=4, lr=0.3
    )
    config = modifier.permute_config(num_sequences=8, ignore=("^lm_head$",))
    assert (config.pattern, config.scorer, config.objective, config.block_size) == ("4:8", "ria", "retained", 32)
    assert config.apply_mask is False and config.ignore == ("^lm_head$",) and config.steps_per_layer == 2
    assert config.lr == 0.3 and config.learner(2).lr == 0.3


def test_calibration_ids_from_a_dataloader():
    batches = [{"input_ids": torch.arange(8)[None] + i, "attention_mask": torch.ones(1, 8)} for i in range(3)]
    assert calibration_ids(batches).shape == (3, 8)
    assert calibration_ids(batches, max_sequences=2).shape == (2, 8)
    padded = [
        {
            "input_ids": torch.tensor([[0, 0, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6]]),
            "attention_mask": torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]),
        }
    ]
    ids = calibration_ids(padded)  # padding dropped, unequal lengths regrouped into windows of the longest
    assert ids.shape == (1, 6) and ids[0].tolist() == [5, 6, 7, 8, 1, 2]
    with pytest.raises(ValueError, match="needs calibration data"):
        calibration_ids(None)


def test_ignore_uses_llm_compressor_syntax():
    model = tiny_model()
    assert ignored_linears(model, ["lm_head"]) == ("^lm_head$",)
    assert len(ignored_linears(model, ["re:.*q_proj"])) == 2
    assert len(ignored_linears(model, ["Linear"])) == 15
    assert ignored_linears(model, []) == ()


def test_strip_sparsity_config(tmp_path):
    declared = {"format": "sparse-24-bitmask", "sparsity_structure": "2:4"}
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"sparsity_config": declared}}))
    strip_sparsity_config(tmp_path)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    quantized = {"config_groups": {"group_0": {}}, "sparsity_config": declared}
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": quantized}))
    strip_sparsity_config(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["sparsity_config"] == {}


def _state(model, num: int = 6, length: int = 24) -> State:
    """A session state holding ``model`` and a calibration dataloader, as ``oneshot`` prepares it."""
    ids = torch.randint(0, 300, (num, length), generator=torch.Generator().manual_seed(3))
    state = State()
    state.update(model=model, calib_data=DataLoader([{"input_ids": row} for row in ids], batch_size=2))
    return state


def test_lifecycle_without_oneshot_keeps_function_and_writes_sidecar(tmp_path):
    model = tiny_model()
    probe = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        before = model(probe).logits
    modifier = LearnedPermutationModifier(steps_per_layer=2, block_size=16, sequences_per_step=2, select_sequences=2)
    modifier.initialize(_state(model))
    with torch.no_grad():
        assert float((model(probe).logits - before).abs().max()) < 1e-5
    assert modifier.sidecar is sidecar_of(model) and modifier.sidecar.permutations
    assert all(p.requires_grad for p in model.parameters())  # restored after the pass
    model.save_pretrained(tmp_path / "out")
    assert (tmp_path / "out" / SIDECAR_NAME).exists() and Sidecar.load(tmp_path / "out").fold == "exact"
    with pytest.raises(ValueError, match="already permuted"):
        LearnedPermutationModifier(steps_per_layer=0, block_size=16).initialize(_state(model))


def test_apply_mask_prunes_with_its_own_scorer():
    model = tiny_model()
    modifier = LearnedPermutationModifier(
        scorer="magnitude", apply_mask=True, steps_per_layer=1, block_size=16, ignore=["lm_head"]
    )
    modifier.initialize(_state(model))
    assert modifier.sidecar.frames and all(frame is None for frame in modifier.sidecar.frames.values())
    for name in modifier.sidecar.frames:
        assert is_nm(model.get_submodule(name).weight, NMPattern(2, 4)), name


def test_package_imports_without_llm_compressor():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['llmcompressor'] = None; import nmperm_plugin; "
        "assert 'LearnedPermutationModifier' not in nmperm_plugin.__all__; print('ok')"
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip().endswith("ok"), done.stderr[-2000:]
