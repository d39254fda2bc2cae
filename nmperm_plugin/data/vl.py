"""Image-and-text calibration for Qwen2.5-VL and Qwen2-VL in ``nmperm prune``, and their processor.

The dataset (:func:`load_captioned_images`) is a saved ``datasets`` folder with an ``Image`` column
and, optionally, a text column (the first of :data:`TEXT_COLUMNS`: a prompt or a caption), or a
folder of images (any depth), each with an optional caption in a text file of the same name
(``cat.png``, ``cat.txt``).

:class:`QwenVLProcessor` turns them into model inputs as transformers' ``Qwen2_5_VLProcessor`` does
(``tests/test_qwen_vl_processor.py`` compares the two), from the tokenizer and the image processor
saved beside the model (``preprocessor_config.json``, as the hub's checkpoints have it, or the
``image_processor`` entry of ``processor_config.json``, where transformers 5's
``processor.save_pretrained`` puts it), so without torchvision, which that processor's video half
needs: each sample's prompt is the model's chat template (the processor's ``chat_template.json`` /
``chat_template.jinja``, else the tokenizer's) over one user turn holding the image and the text, or
``<|vision_start|><|image_pad|><|vision_end|>text`` when the model has none; the image processor
(its PIL form) gives ``pixel_values`` and ``image_grid_thw``, and the one ``<|image_pad|>`` becomes
``t * h * w / merge_size ** 2`` of them, one per merged patch; ``mm_token_type_ids`` marks them.

The layer walk takes the rotary positions and attention bounds from the first sample, so every
sample has one layout (:func:`vl_batches`): the images are resized to the first one's size (one
grid), the image comes first in every prompt (the same placeholder positions), and the token
sequences are cut to the shortest one's length (at most ``--seq-len``), never into the image.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from loguru import logger
from torch import nn

from ..arch.qwen_vl import per_sample_images
from ..io.checks import check_finite_parameters
from ..io.models import check_model_directory, load_checkpoint_model
from .images import BATCH, IMAGE_SUFFIXES, image_column, load_image_processor, pick_indices
from .text import is_datasets_folder, load_datasets_folder, read_text

TEXT_COLUMNS = ("text", "prompt", "caption", "question")
IMAGE_TOKEN, VISION_START, VISION_END = "<|image_pad|>", "<|vision_start|>", "<|vision_end|>"
PROCESSOR_FILES = (  # what save_pretrained copies from the model directory, as they are
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "chat_template.json",
    "chat_template.jinja",
)
PATCHES = {"patch_size": "patch_size", "temporal_patch_size": "temporal_patch_size", "merge_size": "spatial_merge_size"}


@dataclass
class Captioned:
    """Images (PIL, RGB) and their texts (None: the dataset has none)."""

    images: list
    texts: list[str] | None


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _from_folder(folder: Path) -> Captioned:
    from PIL import Image

    files = _image_files(folder)
    if not files:
        raise ValueError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES[:3])}, ...)")
    images = []
    for file in files:
        with Image.open(file) as image:
            images.append(image.convert("RGB"))
    captions = [file.with_suffix(".txt") for file in files]
    if not any(c.is_file() for c in captions):
        return Captioned(images, None)
    return Captioned(images, [read_text(c).strip() if c.is_file() else "" for c in captions])


def _from_datasets(path: Path) -> Captioned:
    dataset = load_datasets_folder(path)
    column = image_column(dataset)
    if column is None:
        raise ValueError(f"dataset {path} has no image column (columns: {dataset.column_names})")
    text = next((c for c in TEXT_COLUMNS if c in dataset.column_names), None)
    images = [image.convert("RGB") for image in dataset[column]]
    return Captioned(images, [t or "" for t in dataset[text]] if text else None)


def load_captioned_images(source: str | Path) -> Captioned:
    """The images and texts of ``source`` (see the module docstring)."""
    path = Path(source)
    if not path.is_dir():
        raise ValueError(f"{path} is not a folder of images or a datasets folder with an Image column")
    return _from_datasets(path) if is_datasets_folder(path) else _from_folder(path)


def _chat_template(directory: Path, tokenizer) -> str | None:
    """The processor's chat template (``chat_template.jinja`` or ``chat_template.json``), else the tokenizer's."""
    jinja, saved = directory / "chat_template.jinja", directory / "chat_template.json"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    if saved.is_file():
        return json.loads(saved.read_text(encoding="utf-8")).get("chat_template")
    return getattr(tokenizer, "chat_template", None)


def _nested_image_processor(directory: Path) -> dict | None:
    """The ``image_processor`` entry of ``directory``'s ``processor_config.json``, if it has one."""
    saved = directory / "processor_config.json"
    entry = json.loads(saved.read_text(encoding="utf-8")).get("image_processor") if saved.is_file() else None
    return entry if isinstance(entry, dict) else None


def _load_image_processor(directory: Path):
    """The image processor saved beside the model: ``preprocessor_config.json`` (:func:`load_image_processor`),
    else ``processor_config.json``'s ``image_processor`` entry, in its PIL form where transformers has one."""
    entry = _nested_image_processor(directory)
    if (directory / "preprocessor_config.json").is_file() or entry is None:
        return load_image_processor(directory)  # FileNotFoundError saying how to save one when there is none
    import transformers

    name = entry.get("image_processor_type") or ""
    for candidate in (f"{name}Pil", name.removesuffix("Fast") + "Pil", name):
        found = getattr(transformers, candidate, None) if candidate else None
        if isinstance(found, type):
            return found.from_pretrained(directory, trust_remote_code=False)
    return transformers.AutoImageProcessor.from_pretrained(directory, trust_remote_code=False)


def _check_matches(directory: Path, config: dict, tokenizer, image_processor) -> int:
    """The model's image token id, once the tokenizer and the image processor are found to be its own."""
    image_token_id = config.get("image_token_id")
    found = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_token_id is None or found != image_token_id:
        raise ValueError(
            f"{directory}: the tokenizer's {IMAGE_TOKEN} is token {found}, the model's image_token_id is "
            f"{image_token_id}: save the model's own tokenizer beside it (with its special tokens {VISION_START}, "
            f"{IMAGE_TOKEN}, {VISION_END})"
        )
    vision = config.get("vision_config", {})
    differ = [
        f"{mine} {getattr(image_processor, mine, None)} (the model's {theirs}: {vision.get(theirs)})"
        for mine, theirs in PATCHES.items()
        if theirs in vision and getattr(image_processor, mine, None) != vision[theirs]
    ]
    if differ:
        raise ValueError(f"{directory}: the image processor's {', '.join(differ)} differ: save the model's own")
    return image_token_id


@dataclass
class QwenVLProcessor:
    """A Qwen2.5-VL / Qwen2-VL model's tokenizer and image processor (see the module docstring)."""

    directory: Path
    tokenizer: object
    image_processor: object | None  # None: the model has none saved (text calibration only)
    chat_template: str | None
    image_token_id: int | None

    @classmethod
    def from_directory(cls, directory: str | Path, config: dict, images: bool = False) -> QwenVLProcessor:
        """The processor saved beside the model in ``directory`` (``config``: its ``config.json``); with
        ``images`` its image processor must be there (``FileNotFoundError`` saying how to save it)."""
        from transformers import AutoTokenizer

        directory = Path(directory)
        tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
        image_processor = None
        if images or (directory / "preprocessor_config.json").is_file() or _nested_image_processor(directory):
            image_processor = _load_image_processor(directory)
        token = None if image_processor is None else _check_matches(directory, config, tokenizer, image_processor)
        return cls(directory, tokenizer, image_processor, _chat_template(directory, tokenizer), token)

    def prompt(self, text: str) -> str:
        """One image and ``text`` as the model's prompt: its chat template's user turn, or the plain
        ``<|vision_start|><|image_pad|><|vision_end|>text``."""
        if self.chat_template is None:
            return f"{VISION_START}{IMAGE_TOKEN}{VISION_END}{text}"
        content = [{"type": "image"}] + ([{"type": "text", "text": text}] if text else [])
        rendered = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], chat_template=self.chat_template, tokenize=False
        )
        if rendered.count(IMAGE_TOKEN) != 1:
            raise ValueError(
                f"{self.directory}: the chat template renders a user turn with one image as "
                f"{rendered.count(IMAGE_TOKEN)} {IMAGE_TOKEN} tokens, not one: not a Qwen-VL chat template"
            )
        return rendered

    def images(self, images: list) -> dict[str, torch.Tensor]:
        """``pixel_values`` (packed, ``[all patches, D]``) and ``image_grid_thw`` ``[images, 3]``."""
        if self.image_processor is None:
            load_image_processor(self.directory)  # raises: there is none
        out = self.image_processor(images=images, return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}

    def token_ids(self, text: str, image_tokens: int) -> torch.Tensor:
        """``text``'s prompt as token ids, its image placeholder expanded to ``image_tokens`` tokens."""
        expanded = self.prompt(text).replace(IMAGE_TOKEN, IMAGE_TOKEN * image_tokens)
        return torch.tensor(self.tokenizer(expanded)["input_ids"])

    def save_pretrained(self, directory: str | Path) -> None:
        """The tokenizer, and the processor's files (:data:`PROCESSOR_FILES`) as the model directory has them."""
        self.tokenizer.save_pretrained(directory)
        for name in PROCESSOR_FILES:
            if (self.directory / name).is_file():
                shutil.copyfile(self.directory / name, Path(directory) / name)


def _same_size(images: list) -> list:
    """The images at the first one's size (one grid of patches for all)."""
    size = images[0].size
    resized = [image if image.size == size else image.resize(size) for image in images]
    moved = sum(image.size != size for image in images)
    if moved:
        logger.info(
            f"nmperm: {moved} of {len(images)} calibration images resized to the first one's {size[0]}x{size[1]}"
        )
    return resized


def _common_length(rows: list[torch.Tensor], image_end: int, seq_len: int) -> int:
    """The length every sample is cut to: the shortest one's, at most ``seq_len``, never into the image."""
    length = min(seq_len, *(len(row) for row in rows))
    if length <= image_end:
        raise ValueError(
            f"the calibration samples' image tokens end at token {image_end}, but --seq-len {seq_len} (or the "
            f"shortest sample) stops at {length}: raise --seq-len or give smaller images"
        )
    if length < max(len(row) for row in rows):
        logger.info(f"nmperm: the calibration samples cut to {length} tokens (one layout for all: the shortest)")
    return length


def vl_inputs(data: Captioned, processor: QwenVLProcessor, indices: list[int], seq_len: int) -> dict:
    """The chosen samples as one batch of model inputs of one layout, every tensor batch-first
    (:func:`~nmperm_plugin.arch.qwen_vl.per_sample_images`)."""
    pixels = processor.images(_same_size([data.images[i] for i in indices]))
    merge = processor.image_processor.merge_size
    image_tokens = int(pixels["image_grid_thw"][0].prod()) // merge**2
    texts = [data.texts[i] if data.texts is not None else "" for i in indices]
    rows = [processor.token_ids(text, image_tokens) for text in texts]
    placeholders = [torch.nonzero(row == processor.image_token_id).flatten() for row in rows]
    if any(not torch.equal(p, placeholders[0]) for p in placeholders):
        raise ValueError("the prompts place the image at different tokens: the chat template must put it first")
    length = _common_length(rows, int(placeholders[0][-1]) + 1, seq_len)
    ids = torch.stack([row[:length] for row in rows])
    marks = (ids == processor.image_token_id).long()  # int64, as the processor's
    text = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": marks}
    return per_sample_images(text | pixels)


def vl_batches(
    data: Captioned, processor: QwenVLProcessor, num_samples: int, seq_len: int, seed: int | None
) -> list[dict]:
    """``num_samples`` images with their texts (drawn with ``seed``; None: the first ones) as
    calibration batches of model inputs for ``permute_parts_`` (see the module docstring)."""
    inputs = vl_inputs(data, processor, pick_indices(len(data.images), num_samples, seed), seq_len)
    return [
        {key: value[start : start + BATCH] for key, value in inputs.items()} for start in range(0, num_samples, BATCH)
    ]


def load_vl_model(path: str | Path, images: bool = False) -> tuple[nn.Module, QwenVLProcessor]:
    """``(model, processor)`` of a Qwen2.5-VL or Qwen2-VL directory: the model as the class its config
    names, in float32, never running code from it; the processor first (its errors before the load;
    ``images``: the image processor must be there)."""
    config = check_model_directory(path)
    processor = QwenVLProcessor.from_directory(path, config, images)
    logger.info(f"loading model {path}")
    model = load_checkpoint_model(path)
    check_finite_parameters(model, f"model {path}")
    return model.eval(), processor
