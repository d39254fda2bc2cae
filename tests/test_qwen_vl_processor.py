"""nmperm's Qwen-VL processor (:class:`~nmperm_plugin.data.vl.QwenVLProcessor`, a tokenizer and the PIL
image processor) against transformers' own ``Qwen2_5_VLProcessor`` and ``Qwen2VLProcessor``: the same
``input_ids`` (the image placeholder repeated per merged patch), ``attention_mask``,
``mm_token_type_ids``, ``image_grid_thw`` and ``pixel_values`` for images of several sizes, with and
without a caption, through the Qwen2-VL chat template or the plain prompt; and the calibration
batches (:func:`~nmperm_plugin.data.vl.vl_batches`) against the real processor run on each sample.

The checkpoint directories are laid out as the hub's are (``preprocessor_config.json``,
``chat_template.json``) and as transformers 5's ``processor.save_pretrained`` writes them
(``processor_config.json`` holding the image and video processors, ``chat_template.jinja``), with
the tiny tokenizer of ``test_qwen_vl_cli`` and image processors of 4-pixel patches and of the real
models' 14-pixel ones.

transformers' processor needs a video processor, and that needs torchvision, which imports only
beside a newer torch than this project's environment tests, so these tests run in the timm tests'
environment (README, "timm tests"; .ci/run's second stage, where NMPERM_OPTIONAL=timm,torchvision makes
a missing torchvision fail); elsewhere they skip naming the missing module (tests/optional_deps.py)."""

import json

import pytest
import torch
from optional_deps import require
from PIL import Image
from test_qwen_vl_cli import TOKENS, vl_tokenizer
from transformers import AutoProcessor, Qwen2_5_VLProcessor, Qwen2VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from nmperm_plugin.arch.qwen_vl import per_sample_images
from nmperm_plugin.data.vl import Captioned, QwenVLProcessor, vl_batches, vl_inputs

require("torchvision", "transformers' Qwen-VL processors need it for their video processor; see README: timm tests")
Qwen2VLVideoProcessor = require("transformers.models.qwen2_vl.video_processing_qwen2_vl").Qwen2VLVideoProcessor

QWEN2_VL_CHAT = (  # Qwen2-VL-Instruct's and Qwen2.5-VL-Instruct's chat template, as their chat_template.json
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: "
    "{% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PROCESSORS = {"qwen2_5_vl": Qwen2_5_VLProcessor, "qwen2_vl": Qwen2VLProcessor}
MEAN, STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]  # the models' own
PIXELS = {4: (16 * 16, 32 * 32), 14: (56 * 56, 112 * 112)}  # min and max pixels per patch size: a few patches
SIZES = [(28, 28), (56, 28), (16, 16), (40, 24), (100, 60), (112, 56)]  # width x height: some resized, some not
CAPTIONS = ["a cat", "", "two of every four weights are kept", "the order of channels"]
TEXT_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids")
CASES = [  # family, layout (hub: preprocessor_config.json; saved: transformers 5's), chat template file, patch size
    ("qwen2_5_vl", "hub", "chat_template.json", 14),
    ("qwen2_5_vl", "hub", None, 4),
    ("qwen2_5_vl", "saved", "chat_template.jinja", 4),
    ("qwen2_vl", "hub", "chat_template.json", 4),
    ("qwen2_vl", "saved", "chat_template.jinja", 14),
    ("qwen2_vl", "saved", None, 4),
]


def _images(sizes=SIZES, seed: int = 5) -> list:
    generator = torch.Generator().manual_seed(seed)
    return [
        Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=generator, dtype=torch.uint8).numpy())
        for w, h in sizes
    ]


def _save_checkpoint(directory, family: str, layout: str, template: str | None, patch: int) -> dict:
    """A Qwen-VL checkpoint's processor files in ``directory``; returns the model config's parts that
    :class:`QwenVLProcessor` checks them against."""
    tokenizer = vl_tokenizer()
    low, high = PIXELS[patch]
    sizes = dict(patch_size=patch, temporal_patch_size=2, merge_size=2, min_pixels=low, max_pixels=high)
    if layout == "hub":  # the hub's files: preprocessor_config.json as Qwen/Qwen2.5-VL-*-Instruct has it
        tokenizer.save_pretrained(directory)
        saved = sizes | {"image_mean": MEAN, "image_std": STD, "image_processor_type": "Qwen2VLImageProcessor"}
        saved["processor_class"] = PROCESSORS[family].__name__
        (directory / "preprocessor_config.json").write_text(json.dumps(saved, indent=2))
        if template:
            (directory / template).write_text(json.dumps({"chat_template": QWEN2_VL_CHAT}))
    else:  # transformers 5's processor.save_pretrained: processor_config.json (image and video), chat_template.jinja
        image, video = Qwen2VLImageProcessorPil(**sizes), Qwen2VLVideoProcessor(**sizes)
        chat = QWEN2_VL_CHAT if template else None
        processor = PROCESSORS[family](image, tokenizer, video, chat_template=chat)
        processor.save_pretrained(directory)
        assert not (directory / "preprocessor_config.json").exists()
        assert (directory / "chat_template.jinja").is_file() == bool(template)
    vision = {"patch_size": patch, "temporal_patch_size": 2, "spatial_merge_size": 2}
    return {"image_token_id": TOKENS[0], "vision_config": vision}


@pytest.fixture(scope="module", params=CASES, ids=lambda case: "-".join(str(part) for part in case))
def pair(request, tmp_path_factory):
    """``(ours, theirs, exact)``: :class:`QwenVLProcessor` and transformers' processor loaded from one
    checkpoint directory: ``theirs`` as ``AutoProcessor`` loads it (the torchvision image processor),
    ``exact`` the same processor with the PIL image processor ours uses."""
    family, layout, template, patch = request.param
    directory = tmp_path_factory.mktemp(f"{family}-{layout}")
    config = _save_checkpoint(directory, family, layout, template, patch)
    ours = QwenVLProcessor.from_directory(directory, config, images=True)
    theirs = AutoProcessor.from_pretrained(directory)
    assert type(theirs) is PROCESSORS[family]
    assert (theirs.chat_template is None) == (template is None) and ours.chat_template == theirs.chat_template
    image = Qwen2VLImageProcessorPil.from_pretrained(directory)
    exact = type(theirs)(image, theirs.tokenizer, theirs.video_processor, chat_template=theirs.chat_template)
    return ours, theirs, exact


def _their_prompt(processor, text: str) -> str:
    """What a user of transformers' processor writes for one image and ``text``."""
    if processor.chat_template is None:
        return f"<|vision_start|><|image_pad|><|vision_end|>{text}"
    content = [{"type": "image"}] + ([{"type": "text", "text": text}] if text else [])
    return processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False)


def _assert_pixels(ours: torch.Tensor, theirs: torch.Tensor, grid: torch.Tensor, images: list, pil: bool) -> int:
    """Packed ``pixel_values`` of ``images`` (``grid``: their ``image_grid_thw``, 14- or 4-pixel patches)
    equal to ``theirs``: exactly from transformers' PIL image processor (ours, ``pil``), to float rounding
    from its torchvision one where the image needs no resizing; a resized image's pixels differ there,
    as transformers' two backends resample differently (these noise images by one grey level, by up to
    18 where an image is enlarged one way and shrunk the other). Returns how many images were compared."""
    assert ours.dtype == theirs.dtype == torch.float32 and ours.shape == theirs.shape
    if pil:
        assert torch.equal(ours, theirs)
        return len(images)
    counts = grid.prod(-1).tolist()
    patch = 14 if ours.shape[-1] == 3 * 2 * 14 * 14 else 4  # D: 3 channels x 2 frames x patch x patch
    unresized = [image.size == (w * patch, h * patch) for image, (_, h, w) in zip(images, grid.tolist(), strict=True)]
    for same, mine, real in zip(unresized, ours.split(counts), theirs.split(counts), strict=True):
        if same:
            torch.testing.assert_close(mine, real)
    return sum(unresized)


@pytest.mark.parametrize("size", SIZES, ids=lambda size: f"{size[0]}x{size[1]}")
@pytest.mark.parametrize("text", ["a cat", ""], ids=["caption", "no-caption"])
def test_one_image_and_its_text_are_the_inputs_transformers_gives(pair, size, text):
    ours, theirs, exact = pair
    image = _images([size])
    pixels = ours.images(image)
    grid = pixels["image_grid_thw"]
    ids = ours.token_ids(text, int(grid[0].prod()) // ours.image_processor.merge_size**2)
    assert ours.prompt(text) == _their_prompt(theirs, text)
    for real, pil in ((exact, True), (theirs, False)):
        want = real(images=image, text=[_their_prompt(real, text)], return_tensors="pt")
        assert set(want) == {*TEXT_KEYS, "pixel_values", "image_grid_thw"}
        assert ids.dtype == want["input_ids"].dtype and torch.equal(ids, want["input_ids"][0])
        assert torch.equal(grid, want["image_grid_thw"])
        _assert_pixels(pixels["pixel_values"], want["pixel_values"], grid, image, pil)
        assert want["attention_mask"].eq(1).all()
        assert torch.equal(want["mm_token_type_ids"][0], (ids == TOKENS[0]).long())
    assert (ids == TOKENS[0]).sum() == grid[0].prod() // 4  # one placeholder per merged 2 x 2 patch


def test_images_of_several_sizes_are_packed_as_transformers_packs_them(pair):
    ours, theirs, exact = pair
    images = _images()
    pixels = ours.images(images)
    for real, pil in ((exact, True), (theirs, False)):
        want = real.image_processor(images=images, return_tensors="pt")
        assert torch.equal(pixels["image_grid_thw"], want["image_grid_thw"])
        assert _assert_pixels(pixels["pixel_values"], want["pixel_values"], want["image_grid_thw"], images, pil) >= 1


def _their_rows(processor, images: list, texts: list[str]) -> list[dict]:
    """transformers' processor on each sample, the images at the first one's size (as vl_inputs makes them)."""
    images = [image.resize(images[0].size) for image in images]
    prompts = [_their_prompt(processor, text) for text in texts]
    return [processor(images=[i], text=[t], return_tensors="pt") for i, t in zip(images, prompts, strict=True)]


def _their_batch(rows: list[dict], length: int) -> dict:
    """The samples' sequences cut to ``length``, as one batch-first batch."""
    batch = {key: torch.cat([row[key][:, :length] for row in rows]) for key in TEXT_KEYS}
    batch |= {key: torch.cat([row[key] for row in rows]) for key in ("pixel_values", "image_grid_thw")}
    return per_sample_images(batch)


@pytest.mark.parametrize("cut", [False, True], ids=["whole", "cut"])
def test_calibration_batches_are_transformers_inputs_of_one_layout(pair, cut):
    ours, theirs, exact = pair
    texts = [text or "dense" for text in CAPTIONS] if cut else CAPTIONS  # cut: every sample has text to cut
    data = Captioned(_images(SIZES[:4], seed=9), texts)
    shortest = min(row["input_ids"].shape[1] for row in _their_rows(exact, data.images, texts))
    seq_len = shortest - 1 if cut else 512
    (batch,) = vl_batches(data, ours, 4, seq_len, seed=None)
    for real, pil in ((exact, True), (theirs, False)):
        rows = _their_rows(real, data.images, texts)
        length = min(seq_len, shortest)  # the shortest sample's, at most seq_len
        want = _their_batch(rows, length)
        assert set(batch) == set(want) and batch["input_ids"].shape == (4, length)
        for key in (*TEXT_KEYS, "image_grid_thw"):
            assert batch[key].dtype == want[key].dtype and torch.equal(batch[key], want[key]), key
        packed = (batch["pixel_values"].flatten(0, 1), want["pixel_values"].flatten(0, 1))
        _assert_pixels(*packed, want["image_grid_thw"].flatten(0, 1), [data.images[0]] * 4, pil)
    chosen = [1, 3]  # a drawn subset: the second image's size is the common one
    drawn = vl_inputs(data, ours, chosen, seq_len)
    rows = _their_rows(exact, [data.images[i] for i in chosen], [texts[i] for i in chosen])
    want = _their_batch(rows, drawn["input_ids"].shape[1])
    assert set(drawn) == set(want) and all(torch.equal(drawn[key], want[key]) for key in want)


def test_a_processor_saved_by_transformers_5_is_loaded_and_saved_with_its_image_processor(tmp_path):
    """``processor.save_pretrained`` in transformers 5 writes no ``preprocessor_config.json``: the image
    processor is read from ``processor_config.json`` and travels with the pruned checkpoint."""
    (tmp_path / "in").mkdir()
    config = _save_checkpoint(tmp_path / "in", "qwen2_5_vl", "saved", "chat_template.jinja", 4)
    loaded = QwenVLProcessor.from_directory(tmp_path / "in", config)  # found without images=True
    assert isinstance(loaded.image_processor, Qwen2VLImageProcessorPil) and loaded.image_processor.patch_size == 4
    loaded.save_pretrained(tmp_path / "out")
    for name in ("processor_config.json", "chat_template.jinja"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "in" / name).read_bytes(), name
    again = QwenVLProcessor.from_directory(tmp_path / "out", config, images=True)
    assert again.chat_template == QWEN2_VL_CHAT and again.image_processor.size == loaded.image_processor.size
    assert type(AutoProcessor.from_pretrained(tmp_path / "out")) is Qwen2_5_VLProcessor
