"""Calibration and evaluation text: local files, directories, ``datasets`` folders, or the shipped corpus.

The shipped corpus (``nmperm_plugin/data/wiki_*.txt``) is English Wikipedia text (CC BY-SA 3.0),
rebuilt by ``bench/make_corpus.py`` from the articles bundled in the gensim 4.4.0 wheel; the
calibration and evaluation files hold disjoint articles.
"""

from __future__ import annotations

from pathlib import Path

import torch
from loguru import logger

DATA_DIR = Path(__file__).resolve().parent  # the shipped corpus lies beside this module
BUILTIN = {
    "wiki-calibration": DATA_DIR / "wiki_calibration.txt",
    "wiki-evaluation": DATA_DIR / "wiki_evaluation.txt",
}
TEXT_SUFFIXES = (".txt", ".md", ".text")
BINARY_SHARE = 0.3  # more undecodable (or NUL) bytes than this share: a binary file, refused


def read_text(path: Path) -> str:
    """``path`` decoded as UTF-8; undecodable bytes become U+FFFD with a warning, and a file that is
    mostly undecodable (or holds NUL bytes) is refused as binary."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    else:
        if "\0" in text:
            raise ValueError(f"dataset file {path} holds NUL bytes (UTF-16 text or a binary file?): give UTF-8 text")
        return text
    text = data.decode("utf-8", errors="replace")
    bad = text.count("\ufffd") - data.decode("utf-8", errors="ignore").count("\ufffd")
    nul = b"\0" in data
    if nul or bad > BINARY_SHARE * max(len(text), 1):
        what = "NUL bytes" if nul else f"{bad} undecodable byte sequences in {len(data)} bytes"
        raise ValueError(f"dataset file {path} looks binary ({what}): give UTF-8 text")
    logger.warning(
        f"dataset file {path}: {bad} byte sequences are not valid UTF-8 and were replaced by U+FFFD; is it UTF-8 text?"
    )
    return text


def is_datasets_folder(path: Path) -> bool:
    """Whether ``path`` was written by ``Dataset.save_to_disk`` (or ``DatasetDict.save_to_disk``)."""
    return (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()


def load_datasets_folder(path: Path):
    """The dataset saved in ``path``; of a ``DatasetDict``, its ``train`` split (else its first)."""
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        loaded = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
    return loaded


def _from_datasets(path: Path) -> list[str]:
    loaded = load_datasets_folder(path)
    column = "text" if "text" in loaded.column_names else None
    if column is None:
        strings = [n for n, f in loaded.features.items() if getattr(f, "dtype", None) == "string"]
        if not strings:
            raise ValueError(f"dataset {path} has no text column (columns: {loaded.column_names})")
        column = strings[0]
    return [t for t in loaded[column] if t]


def load_texts(source: str | Path) -> list[str]:
    """Texts from ``builtin:NAME``, a text file, a directory of text files, or a saved ``datasets`` folder."""
    text = str(source)
    if text.startswith("builtin:"):
        name = text.split(":", 1)[1]
        if name not in BUILTIN:
            raise ValueError(f"unknown built-in dataset {name!r}; choose one of {', '.join(BUILTIN)}")
        path = BUILTIN[name]
    else:
        path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"dataset {path} does not exist: give a text file, a directory or a datasets folder")
    if path.is_file():
        texts = [read_text(path)]
    elif is_datasets_folder(path):
        texts = _from_datasets(path)
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        texts = [read_text(p) for p in files]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError(f"dataset {path} is empty: it holds no text to calibrate or evaluate on")
    return texts


def token_windows(
    tokenizer,
    texts: list[str],
    num_samples: int,
    seq_len: int,
    seed: int | None = None,
    samples_option: str = "--num-samples",
) -> torch.LongTensor:
    """``[num_samples, seq_len]`` token windows cut from the concatenated texts.

    ``seed=None`` takes the first windows in order (evaluation); a seed picks random ones (calibration).
    ``samples_option`` is the command-line option that sets ``num_samples`` (named in errors).
    """
    if num_samples <= 0 or seq_len <= 1:
        raise ValueError(f"need num_samples > 0 and seq_len > 1, got {num_samples} and {seq_len}")
    separator = tokenizer.eos_token or "\n\n"
    ids = tokenizer(separator.join(texts), return_tensors="pt", add_special_tokens=False).input_ids[0]
    available = len(ids) // seq_len
    if available < num_samples:
        raise ValueError(
            f"the dataset has {len(ids)} tokens, enough for {available} windows of {seq_len}, but "
            f"{num_samples} were asked for: lower {samples_option} or --seq-len, or give more text"
        )
    windows = ids[: available * seq_len].reshape(available, seq_len)
    if seed is None:
        return windows[:num_samples]
    pick = torch.randperm(available, generator=torch.Generator().manual_seed(seed))[:num_samples]
    return windows[pick.sort().values]
