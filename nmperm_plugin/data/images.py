"""Calibration images for ``nmperm prune``: a folder of images with labels, or a saved ``datasets`` folder.

- A folder with one subfolder per class (``DIR/<class>/*.png``, as torchvision's ``ImageFolder``):
  the class of a subfolder is the model's ``config.label2id[name]``, or ``int(name)`` when the names
  are numbers; a subfolder the model cannot name is refused.
- A ``datasets`` folder (``Dataset.save_to_disk``) with an ``Image`` column and, optionally, a
  ``label`` (or ``labels``) column of class indices; a ``DatasetDict`` gives its ``train`` split.

(A vision-language model's images with their prompts or captions: :mod:`nmperm_plugin.data.vl`,
which also takes a plain folder of images.)

Images become ``pixel_values`` through the model's image processor (saved beside the model:
``preprocessor_config.json``), in batches of model inputs that :func:`nmperm_plugin.permute_` takes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..io.checks import check_finite_parameters
from ..io.models import load_checkpoint_model, read_config
from .text import is_datasets_folder, load_datasets_folder

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
BATCH = 32


@dataclass
class Images:
    """Loaded images (PIL) and their class indices (None: unlabelled)."""

    images: list
    labels: list[int] | None


def _has_images(folder: Path) -> bool:
    return folder.is_dir() and any(f.suffix.lower() in IMAGE_SUFFIXES for f in folder.iterdir())


def _class_folders(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if _has_images(p))


def is_image_dataset(source: str | Path) -> bool:
    """Whether ``source`` is an image dataset: a folder holding images (in class subfolders, or
    directly), or a saved ``datasets`` folder with an ``Image`` column."""
    path = Path(source)
    if not path.is_dir():
        return False
    if is_datasets_folder(path):
        return image_column(load_datasets_folder(path)) is not None
    return _has_images(path) or bool(_class_folders(path))


def image_column(dataset) -> str | None:
    """The name of ``dataset``'s first ``Image`` column (None: it has none)."""
    import datasets

    return next((n for n, f in dataset.features.items() if isinstance(f, datasets.Image)), None)


def _class_index(name: str, label2id: dict) -> int:
    if name in label2id:
        return int(label2id[name])
    if name.isdigit():
        return int(name)
    raise ValueError(
        f"image folder class {name!r} is neither one of the model's labels (config.label2id: "
        f"{', '.join(sorted(label2id)[:5])}...) nor a class number: rename the subfolder"
    )


def load_images(source: str | Path, label2id: dict | None = None) -> Images:
    """The images and labels of ``source`` (see the module docstring)."""
    from PIL import Image

    path = Path(source)
    if is_datasets_folder(path):
        dataset = load_datasets_folder(path)
        column = image_column(dataset)
        if column is None:
            raise ValueError(f"dataset {path} has no image column (columns: {dataset.column_names})")
        label = next((c for c in ("label", "labels") if c in dataset.column_names), None)
        return Images(list(dataset[column]), list(dataset[label]) if label else None)
    folders = _class_folders(path)
    if not folders:
        raise ValueError(f"{path} holds no class subfolders of images ({', '.join(IMAGE_SUFFIXES[:3])}, ...)")
    images, labels = [], []
    for folder in folders:
        index = _class_index(folder.name, label2id or {})
        for file in sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES):
            with Image.open(file) as image:
                images.append(image.convert("RGB"))
            labels.append(index)
    return Images(images, labels)


def pick_indices(available: int, num_samples: int, seed: int | None) -> list[int]:
    """``num_samples`` of ``available`` images' indices, in order: drawn with ``seed`` (None: the first ones)."""
    if num_samples <= 0 or num_samples > available:
        raise ValueError(f"{num_samples} images asked for, the dataset has {available}: lower --num-samples")
    order = torch.arange(available)
    if seed is not None:
        order = torch.randperm(available, generator=torch.Generator().manual_seed(seed))
    return order[:num_samples].sort().values.tolist()


def image_batches(data: Images, processor, num_samples: int, seed: int | None) -> list[dict]:
    """``num_samples`` images (drawn with ``seed``; None: the first ones) as batches of model inputs
    ``{"pixel_values", "labels"}`` (no labels when the dataset has none)."""
    indices = pick_indices(len(data.images), num_samples, seed)
    batches = []
    for start in range(0, num_samples, BATCH):
        chosen = indices[start : start + BATCH]
        batch = dict(processor(images=[data.images[i] for i in chosen], return_tensors="pt"))
        if data.labels is not None:
            batch["labels"] = torch.tensor([data.labels[i] for i in chosen])
        batches.append(batch)
    return batches


@torch.no_grad()
def top1_accuracy(model: nn.Module, batches: list[dict]) -> float:
    """Top-1 accuracy (%) of a classifier on labelled ``batches``."""
    device = next(model.parameters()).device
    right = total = 0
    for batch in batches:
        logits = model(pixel_values=batch["pixel_values"].to(device)).logits
        right += int((logits.argmax(-1).cpu() == batch["labels"]).sum())
        total += len(batch["labels"])
    return 100.0 * right / total


def image_processor_class(path: str | Path) -> type:
    """The image processor class ``path``'s ``preprocessor_config.json`` names, in its PIL form where
    transformers has one (``ViTImageProcessorPil``: no torchvision needed), else ``AutoImageProcessor``."""
    import transformers

    name = json.loads((Path(path) / "preprocessor_config.json").read_text()).get("image_processor_type") or ""
    for candidate in (f"{name}Pil", name.removesuffix("Fast") + "Pil", name):
        found = getattr(transformers, candidate, None) if candidate else None
        if isinstance(found, type):
            return found
    return transformers.AutoImageProcessor


def load_image_processor(path: str | Path):
    """The image processor saved beside the model in ``path`` (:func:`image_processor_class`), never
    running code from it; ``FileNotFoundError`` saying how to save one when there is none."""
    if not (Path(path) / "preprocessor_config.json").is_file():
        raise FileNotFoundError(
            f"{path} has no image processor (preprocessor_config.json): save it beside the model with "
            f"processor.save_pretrained({str(path)!r})"
        )
    return image_processor_class(path).from_pretrained(path, trust_remote_code=False)


def load_vision_model(path: str | Path) -> tuple[nn.Module, object]:
    """``(model, image processor)`` in float32 from a transformers directory (the class its config
    names), never running code from it; the processor must be saved beside the model."""
    read_config(path)
    processor = load_image_processor(path)
    model = load_checkpoint_model(path)
    check_finite_parameters(model, f"model {path}")
    return model.eval(), processor
