"""Rebuild the English corpus shipped in ``nmperm_plugin/data`` (run once; output is committed).

Source: the 102 English Wikipedia articles bundled in the gensim 4.4.0 wheel
(``gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``,
CC BY-SA), cleaned with gensim's own wiki-markup filter. Articles are split by index into two
disjoint sets: even-numbered articles are calibration text, odd-numbered ones evaluation text.

    pip install gensim==4.4.0 smart_open && python bench/make_corpus.py
"""

import bz2
import importlib.util
import re
from pathlib import Path

from gensim.corpora.wikicorpus import extract_pages, filter_wiki

BUDGET = 200_000  # characters per split
PER_ARTICLE = 12_000  # characters per article, for topical diversity
OUT = Path(__file__).resolve().parent.parent / "nmperm_plugin" / "data"


def clean(text: str) -> str:
    text = filter_wiki(text)
    text = re.sub(r"^=+\s*(.*?)\s*=+\s*$", r"\1", text, flags=re.M)  # headings -> plain lines
    text = re.sub(r"^\s*[\*#:;|!{].*$", "", text, flags=re.M)  # lists and table remnants
    text = text.replace("'''", "").replace("''", "")
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def main() -> None:
    root = importlib.util.find_spec("gensim").submodule_search_locations[0]
    path = Path(root) / "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
    articles = [
        (title, clean(text))
        for title, text, _ in extract_pages(bz2.BZ2File(path))
        if not text.lower().startswith("#redirect")
    ]
    for name, part in (("calibration", articles[0::2]), ("evaluation", articles[1::2])):
        chunks, size = [], 0
        for title, text in part:
            if len(text) < 2000 or size >= BUDGET:
                continue
            body = text[: min(PER_ARTICLE, BUDGET - size)].rsplit("\n", 1)[0]
            chunks.append(f"{title}\n\n{body}")
            size += len(body)
        (OUT / f"wiki_{name}.txt").write_text("\n\n\n".join(chunks) + "\n", encoding="utf-8")
        print(name, len(chunks), "articles", size, "characters")


if __name__ == "__main__":
    main()
