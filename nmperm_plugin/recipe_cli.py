"""``nmperm prune MODEL --dataset DATA --recipe FILE``: run an llm-compressor recipe through ``oneshot``.

Everything that can be checked without the model is checked first (output directory, recipe fields,
modifier order, ``fold: gather`` consent), then the model is calibrated and the checkpoint is
written to a temporary sibling directory that replaces the output directory only at the end.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import torch
from loguru import logger

from .checkpoint import check_output_dir
from .data import load_texts, token_windows
from .sidecar import SIDECAR_NAME


def load_recipe(recipe_path: str | Path):
    """Parse and check a recipe file; raise ``ValueError`` (field typos included) before any work."""
    from llmcompressor.recipe import Recipe

    from .compress import GATHER_REFUSAL, check_recipe
    from .modifier import LearnedPermutationModifier

    path = Path(recipe_path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path} does not exist (see recipes/ for examples)")
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
    path = Path(model_path)
    if path.suffix != ".gguf":
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} has no config.json: not a transformers model directory or .gguf file")
        return path
    from .models import load_model

    model, tokenizer = load_model(path)
    directory = work / "model"
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _calibration_dataset(model_dir: Path, dataset_path, num_samples: int, seq_len: int, seed: int):
    from datasets import Dataset
    from transformers import AutoTokenizer

    texts = load_texts(dataset_path)
    ids = token_windows(AutoTokenizer.from_pretrained(model_dir), texts, num_samples, seq_len, seed=seed)
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})


def _swap_in(staging: Path, target: Path) -> None:
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)


def run_recipe(
    model_path: str | Path,
    dataset_path: str | Path,
    recipe_path: str | Path,
    output_dir: str | Path,
    num_samples: int = 32,
    seq_len: int = 512,
    overwrite: bool = False,
    seed: int = 0,
) -> int:
    """Run ``recipe_path`` on ``model_path`` with ``num_samples x seq_len`` calibration tokens from
    ``dataset_path`` through ``llmcompressor.oneshot``; write the checkpoint (model, tokenizer,
    ``recipe.yaml``, ``nmperm.json``) to ``output_dir`` atomically. Returns the exit status."""
    import nmperm_plugin  # noqa: F401 - registers LearnedPermutationModifier

    target = check_output_dir(output_dir, overwrite).resolve()
    load_recipe(recipe_path)
    from llmcompressor import oneshot

    target.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="nmperm-recipe-") as work:
        model_dir = _model_directory(model_path, Path(work))
        dataset = _calibration_dataset(model_dir, dataset_path, num_samples, seq_len, seed)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            oneshot(
                model=str(model_dir),
                dataset=dataset,
                recipe=str(recipe_path),
                output_dir=str(staging),
                num_calibration_samples=len(dataset),
                max_seq_length=seq_len,
                shuffle_calibration_samples=False,
            )
            _swap_in(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    if not (target / SIDECAR_NAME).exists():
        logger.warning(f"{recipe_path} has no LearnedPermutationModifier: {target} has no {SIDECAR_NAME}")
    print(f"wrote {target} ({Path(recipe_path).name}, {time.monotonic() - start:.0f} s)")
    return 0
