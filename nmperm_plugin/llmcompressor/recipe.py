"""``nmperm prune MODEL --dataset DATA --recipe FILE``: run an llm-compressor recipe through ``oneshot``.

Everything that can be checked without the work is checked first (output directory, recipe syntax
and fields, modifier order, ``fold: gather`` consent, model files and weights, dataset length), then
the model is calibrated and the checkpoint is written to a staging sibling that replaces the output
directory only once it is complete and verified (:mod:`nmperm_plugin.io.safety`).
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import torch
import yaml
from loguru import logger

from ..data.text import load_texts, token_windows
from ..io import safety
from ..io.checkpoint import check_output_dir, finish_sidecar
from ..io.sidecar import SIDECAR_NAME, Sidecar


def parse_recipe_file(path: Path) -> dict:
    """The recipe file's YAML (or JSON) mapping; ``ValueError`` naming the file and the position."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"recipe {path} is not UTF-8 text") from None
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"recipe {path} is not valid JSON: {error.msg} at line {error.lineno}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or type(error).__name__
        raise ValueError(f"recipe {path} is not valid YAML: {problem}{where}") from None
    if not isinstance(data, dict):
        raise ValueError(
            f"recipe {path} is not a mapping of stages (found {type(data).__name__}): see recipes/ for examples"
        )
    return data


def load_recipe(recipe_path: str | Path):
    """Parse and check a recipe file; raise ``ValueError`` (field typos included) before any work."""
    from llmcompressor.recipe import Recipe

    from .compress import GATHER_REFUSAL, check_recipe
    from .modifier import LearnedPermutationModifier

    path = Path(recipe_path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path} does not exist (see recipes/ for examples)")
    parse_recipe_file(path)
    recipe = Recipe.create_instance(str(path))
    if not recipe.modifiers:
        raise ValueError(f"recipe {path} holds no modifiers: stage keys must end in _stage, groups in _modifiers")
    for modifier in recipe.modifiers:
        if isinstance(modifier, LearnedPermutationModifier):
            check_recipe(modifier, recipe.modifiers)
            if modifier.fold == "gather" and not modifier.allow_gather_checkpoint:
                raise ValueError(GATHER_REFUSAL)
    return recipe


def _model_directory(model_path: str | Path, work: Path) -> Path:
    """A saved transformers directory for ``oneshot``: the path itself, or a plain copy of a GGUF model."""
    from ..io.models import check_model_directory, load_model

    path = Path(model_path)
    if path.suffix != ".gguf":
        if not path.exists():
            raise FileNotFoundError(f"model {path} does not exist: give a transformers directory or a .gguf file")
        check_model_directory(path)
        _check_finite_files(path)
        return path

    model, tokenizer = load_model(path)
    directory = work / "model"
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _check_finite_files(directory: Path) -> None:
    """NaN or inf in any stored weight, read tensor by tensor (``oneshot`` loads the model itself)."""
    from safetensors import safe_open

    from ..io.checks import NonFiniteError, non_finite_tensors

    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            found = non_finite_tensors((name, handle.get_tensor(name)) for name in handle.keys())  # noqa: SIM118
        if found:
            names = ", ".join(f"{name} ({bad} of {numel})" for name, bad, numel in found[:3])
            raise NonFiniteError(
                f"model {directory} has NaN or infinite weights in {names} ({path.name}): the checkpoint is corrupt, "
                "so nothing can be pruned on it; use an intact copy of the model"
            )


def _calibration_dataset(model_dir: Path, texts: list[str], num_samples: int, seq_len: int, seed: int):
    from datasets import Dataset
    from transformers import AutoTokenizer

    from ..io.models import check_seq_len, read_config

    check_seq_len(read_config(model_dir), seq_len)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    ids = token_windows(tokenizer, texts, num_samples, seq_len, seed=seed)
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})


def run_recipe(
    model_path: str | Path,
    dataset_path: str | Path,
    recipe_path: str | Path,
    output_dir: str | Path,
    num_samples: int = 32,
    seq_len: int = 512,
    overwrite: bool = False,
    seed: int = 0,
    inputs: Iterable[tuple[str, str | Path | None]] = (),
) -> int:
    """Run ``recipe_path`` on ``model_path`` with ``num_samples x seq_len`` calibration tokens from
    ``dataset_path`` through ``llmcompressor.oneshot``; write the checkpoint (model, tokenizer,
    ``recipe.yaml``, ``nmperm.json`` with checksums) to ``output_dir`` atomically, after it passed
    ``nmperm verify``'s checks. ``inputs``: further ``(label, path)`` the output must not be or contain
    (the model, dataset and recipe always are). Returns the exit status."""
    from . import modifier  # noqa: F401 - registers LearnedPermutationModifier with ModifierFactory

    inputs = [("the input model", model_path), ("the dataset", dataset_path), ("the recipe", recipe_path), *inputs]
    target = check_output_dir(output_dir, overwrite, inputs)
    load_recipe(recipe_path)
    from llmcompressor import oneshot

    torch.manual_seed(seed)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="nmperm-recipe-") as work:
        texts = load_texts(dataset_path)
        model_dir = _model_directory(model_path, Path(work))
        dataset = _calibration_dataset(model_dir, texts, num_samples, seq_len, seed)

        def write(staging: Path) -> None:
            oneshot(
                model=str(model_dir),
                dataset=dataset,
                recipe=str(recipe_path),
                output_dir=str(staging),
                num_calibration_samples=len(dataset),
                max_seq_length=seq_len,
                shuffle_calibration_samples=False,
                trust_remote_code_model=False,
            )
            if (staging / SIDECAR_NAME).exists():
                finish_sidecar(staging, Sidecar.load(staging))

        target = safety.atomic_write(target, write, overwrite, inputs, note=logger.warning)
    if (target / SIDECAR_NAME).exists():
        sidecar = Sidecar.load(target)
        what = f"{sidecar.pattern}, {sidecar.method}, fold {sidecar.fold}, verified"
    else:
        logger.warning(f"{recipe_path} has no LearnedPermutationModifier: {target} has no {SIDECAR_NAME}")
        what = f"no {SIDECAR_NAME}: not verified"
    print(f"wrote {target} ({Path(recipe_path).name}: {what}, {time.monotonic() - start:.0f} s)")
    return 0
