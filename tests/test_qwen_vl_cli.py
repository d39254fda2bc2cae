"""``nmperm prune --parts`` on a tiny random Qwen2.5-VL saved with an offline processor (a BPE tokenizer
with the vision special tokens, ``Qwen2VLImageProcessor`` with 4-pixel patches): image-and-text
calibration from a ``datasets`` folder or a folder of images (:mod:`nmperm_plugin.data.vl`), the
chosen parts pruned, the processor written beside the output, ``nmperm verify`` passing; and the
refusals before anything loads."""

import json

import pytest
import torch
from conftest import TEXT, tiny_model
from test_qwen_vl import vl_model
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

import nmperm_plugin.cli.prune as cli
from nmperm_plugin.cli.commands import main
from nmperm_plugin.data.vl import Captioned, QwenVLProcessor, load_captioned_images, vl_batches
from nmperm_plugin.io.sidecar import Sidecar

SPECIALS = ["<unk>", "<eos>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"]
TOKENS = (3, 5, 2, 4)  # the model's image, video, vision start and end token ids: the tokenizer's
CAPTIONS = ["a cat", "two of every four weights", "", "the order of channels", "learned permutation", "dense"]
CHAT = (  # Qwen2-VL's chat template, short: the image (and text) of each turn
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
)
FAST = ["--num-samples", "4", "--seq-len", "32", "--block-size", "16", "--method", "ria"]

pytestmark = pytest.mark.usefixtures("one_thread")


def vl_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def _images(count: int = 6):
    from PIL import Image

    generator = torch.Generator().manual_seed(3)
    sizes = [(16, 16), (20, 16)]  # the second size is resized to the first: one grid of 4 x 4 patches
    return [
        Image.fromarray(torch.randint(0, 256, (*sizes[i % 2], 3), generator=generator, dtype=torch.uint8).numpy())
        for i in range(count)
    ]


@pytest.fixture(scope="module")
def saved_vl(tmp_path_factory):
    """A tiny Qwen2.5-VL with its tokenizer and image processor (``preprocessor_config.json`` naming
    ``Qwen2VLImageProcessor``, as a real checkpoint's), the processor's chat template, a ``datasets``
    folder of images with captions and a folder of images with caption files."""
    from datasets import Dataset, Features, Image, Value

    root = tmp_path_factory.mktemp("qwen-vl")
    directory = root / "vl"
    vl_model("qwen2_5_vl", window_size=8, vocab=300, tokens=TOKENS).save_pretrained(directory)
    vl_tokenizer().save_pretrained(directory)
    Qwen2VLImageProcessorPil(
        patch_size=4, temporal_patch_size=2, merge_size=2, min_pixels=16 * 16, max_pixels=32 * 32
    ).save_pretrained(directory)
    (directory / "chat_template.json").write_text(json.dumps({"chat_template": CHAT}))
    images = _images()
    (root / "images" / "sub").mkdir(parents=True)
    for index, image in enumerate(images):
        image.save(root / "images" / ("sub" if index % 2 else "") / f"{index}.png")
    (root / "images" / "0.txt").write_text("a cat on a mat")
    features = Features({"image": Image(), "caption": Value("string")})
    Dataset.from_dict({"image": images, "caption": CAPTIONS}, features=features).save_to_disk(root / "dataset")
    (root / "calib.txt").write_text(TEXT)
    return root


def _prune(root, dataset: str, out: str, *extra) -> int:
    return main(["prune", str(root / "vl"), "--dataset", str(root / dataset), "--output", str(root / out), *extra])


def _parts_pruned(sidecar: Sidecar) -> set[str]:
    return {"vision" if n.startswith("model.visual.") else "text" for n in sidecar.frames}


@pytest.mark.parametrize(
    "parts,dataset,extra",
    [
        ("vision,text", "dataset", ["--method", "learned", "--objective", "end_to_end", "--end-to-end-steps", "2"]),
        ("vision", "images", ["--ignore", r"model\.visual\.blocks\.0\."]),  # the tower's block 0 left dense
        ("text", "dataset", []),
    ],
)
def test_prune_parts_on_images_writes_a_verified_checkpoint_with_the_processor(saved_vl, parts, dataset, extra, capsys):
    out = f"out-{parts.replace(',', '-')}-{dataset}"
    assert _prune(saved_vl, dataset, out, *FAST, "--parts", parts, *extra, "--sequences-per-step", "2") == 0
    sidecar = Sidecar.load(saved_vl / out)
    assert sidecar.architecture == "qwen_vl" and _parts_pruned(sidecar) == set(parts.split(","))
    assert len(sidecar.frames) == {"vision,text": 24, "vision": 5, "text": 14}[parts]
    for name in ("preprocessor_config.json", "chat_template.json", "tokenizer.json"):
        assert (saved_vl / out / name).is_file(), name  # the processor travels with the checkpoint
    processor = QwenVLProcessor.from_directory(saved_vl / out, json.loads((saved_vl / out / "config.json").read_text()))
    assert processor.chat_template == CHAT and processor.image_token_id == TOKENS[0]
    capsys.readouterr()
    assert main(["verify", str(saved_vl / out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["checks"][0]["detail"] == "Qwen2_5_VLForConditionalGeneration"


def test_a_text_dataset_prunes_the_text_decoder_and_records_perplexity(saved_vl, capsys):
    assert _prune(saved_vl, "calib.txt", "out-text", *FAST, "--eval-dataset", str(saved_vl / "calib.txt")) == 0
    sidecar = Sidecar.load(saved_vl / "out-text")
    assert _parts_pruned(sidecar) == {"text"} and sidecar.figures["perplexity"] > 1
    assert (saved_vl / "out-text" / "preprocessor_config.json").is_file()
    capsys.readouterr()
    assert main(["verify", str(saved_vl / "out-text")]) == 0


def _no_work(*args, **kwargs):
    raise AssertionError("work started before the refusal")


@pytest.mark.parametrize(
    "case,message",
    [
        ("vision on text", "--parts vision: the vision tower calibrates on images, and --dataset"),
        ("vision on llama", "--parts vision: a llama model has no vision tower"),
        ("image eval", "a vision-language model is evaluated by its perplexity on held-out text"),
        ("recipe", "--parts would be ignored"),
    ],
)
def test_refusals_come_before_the_model_loads(case, message, saved_vl, tmp_path, monkeypatch, capsys):
    for loader in ("load_vl_model", "load_model", "load_vision_model"):
        monkeypatch.setattr(cli, loader, _no_work)
    model, dataset, extra = saved_vl / "vl", saved_vl / "calib.txt", ["--parts", "vision"]
    if case == "vision on llama":
        model, dataset = tmp_path / "llama", saved_vl / "dataset"
        tiny_model().save_pretrained(model)
        vl_tokenizer().save_pretrained(model)
    if case == "image eval":
        dataset, extra = saved_vl / "dataset", ["--eval-dataset", str(saved_vl / "images")]
    if case == "recipe":
        extra += ["--recipe", "recipes/wanda-2of4-learned.yaml"]
    argv = ["prune", str(model), "--dataset", str(dataset), "--output", str(tmp_path / "out"), *FAST, *extra]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_image_dataset_needs_the_image_processor_before_the_model_loads(saved_vl, tmp_path, monkeypatch, capsys):
    import shutil

    import nmperm_plugin.data.vl as vl_data

    shutil.copytree(saved_vl / "vl", tmp_path / "vl", ignore=shutil.ignore_patterns("preprocessor_config.json"))
    monkeypatch.setattr(vl_data, "load_checkpoint_model", _no_work)
    argv = ["prune", str(tmp_path / "vl"), "--dataset", str(saved_vl / "dataset"), "--output", str(tmp_path / "out")]
    assert main([*argv, *FAST]) == 2
    assert "has no image processor (preprocessor_config.json): save it beside the model" in capsys.readouterr().err


def test_unknown_parts_are_a_usage_error(saved_vl, capsys):
    with pytest.raises(SystemExit):
        _prune(saved_vl, "dataset", "out-bad", "--parts", "vision,audio")
    assert "argument --parts: ['vision', 'audio']: choose one or both of 'vision', 'text'" in capsys.readouterr().err


# -- the calibration data -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def processor(saved_vl) -> QwenVLProcessor:
    return QwenVLProcessor.from_directory(saved_vl / "vl", json.loads((saved_vl / "vl" / "config.json").read_text()))


def test_datasets_and_folders_give_images_with_their_texts(saved_vl):
    data = load_captioned_images(saved_vl / "dataset")
    assert len(data.images) == 6 and data.texts == CAPTIONS
    folder = load_captioned_images(saved_vl / "images")  # any depth; captions from same-named .txt files
    assert len(folder.images) == 6 and folder.texts[0] == "a cat on a mat" and set(folder.texts[1:]) == {""}
    with pytest.raises(ValueError, match="holds no images"):
        load_captioned_images(saved_vl / "vl")


def test_batches_have_one_layout_with_the_image_tokens_of_its_grid(saved_vl, processor):
    data = load_captioned_images(saved_vl / "dataset")
    (batch,) = vl_batches(data, processor, 5, 64, seed=None)
    assert batch["pixel_values"].shape == (5, 16, 96) and batch["image_grid_thw"].tolist() == [[[1, 4, 4]]] * 5
    ids = batch["input_ids"]
    prefix = processor.tokenizer("<|im_start|>user\n<|vision_start|>")["input_ids"]
    assert ids[:, : len(prefix)].eq(torch.tensor(prefix)).all()  # the chat template's user turn, the image first
    image = torch.arange(len(prefix), len(prefix) + 4)  # 16 patches, merged 2 x 2: 4 image tokens
    assert (ids[:, image] == TOKENS[0]).all() and (ids == TOKENS[0]).sum() == 5 * 4
    assert torch.equal(batch["mm_token_type_ids"], (ids == TOKENS[0]).int())
    assert ids.shape[1] == len(processor.token_ids("", 4))  # the shortest: the sample without a caption
    plain = QwenVLProcessor(processor.directory, processor.tokenizer, processor.image_processor, None, TOKENS[0])
    assert plain.prompt("a cat") == "<|vision_start|><|image_pad|><|vision_end|>a cat"


def test_unusable_processors_and_lengths_are_refused(saved_vl, processor):
    config = json.loads((saved_vl / "vl" / "config.json").read_text())
    with pytest.raises(ValueError, match="the model's image_token_id is 7: save the model's own tokenizer"):
        QwenVLProcessor.from_directory(saved_vl / "vl", config | {"image_token_id": 7})
    vision = config["vision_config"] | {"patch_size": 14}
    with pytest.raises(ValueError, match="patch_size 4 .the model's patch_size: 14. differ"):
        QwenVLProcessor.from_directory(saved_vl / "vl", config | {"vision_config": vision})
    with pytest.raises(ValueError, match=r"image tokens end at token \d+, but --seq-len 6"):
        vl_batches(Captioned(_images(2), None), processor, 2, 6, seed=None)
    with pytest.raises(ValueError, match="3 images asked for, the dataset has 2"):
        vl_batches(Captioned(_images(2), None), processor, 3, 64, seed=None)
