"""Where a benchmark whose ``--output`` names a pair of result files writes them, and the writing."""

from __future__ import annotations

import json
from pathlib import Path


def result_pair(output: str | Path) -> tuple[Path, Path]:
    """``output``.json and ``output``.md; ``output`` may end in either. A dot elsewhere in the name
    stays (``vit-average-0.9`` gives ``vit-average-0.9.json``, not ``vit-average-0.json``)."""
    output = Path(output)
    stem = output.with_suffix("") if output.suffix in (".json", ".md") else output
    return stem.parent / f"{stem.name}.json", stem.parent / f"{stem.name}.md"


def write_pair(output: str | Path, result: dict, markdown: str) -> tuple[Path, Path]:
    """``result`` as JSON (indent 1, a final newline) and ``markdown`` at :func:`result_pair` of
    ``output``, its folder made if missing; returns the two paths."""
    json_path, md_path = result_pair(output)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    md_path.write_text(markdown)
    return json_path, md_path
