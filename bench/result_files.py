"""Where a benchmark whose ``--output`` names a pair of result files writes them."""

from __future__ import annotations

from pathlib import Path


def result_pair(output: str | Path) -> tuple[Path, Path]:
    """``output``.json and ``output``.md; ``output`` may end in either. A dot elsewhere in the name
    stays (``vit-average-0.9`` gives ``vit-average-0.9.json``, not ``vit-average-0.json``)."""
    output = Path(output)
    stem = output.with_suffix("") if output.suffix in (".json", ".md") else output
    return stem.parent / f"{stem.name}.json", stem.parent / f"{stem.name}.md"
