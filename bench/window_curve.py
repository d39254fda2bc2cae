"""The window objective's quality, time and memory against its window size K (issue 15, item 4).

Each point is a ``bench/quality.py`` run of ``learned window (exact)`` with ``--set window_layers=K``
(K = all: ``learned end_to_end (exact)``), one seed, the same protocol; the 2:4 and unstructured
rows of the same seed and protocol give the share of the structural gap closed (log perplexity)::

    Q="python bench/quality.py --seeds 0 --num-samples 16 --eval-samples 16"
    $Q --methods "learned window (exact)" --set window_layers=1 --output w1.json   # 2, 4, 8 alike
    $Q --methods "learned end_to_end (exact)" "2:4 no permutation" "unstructured 50%" --output e2e.json
    python bench/window_curve.py w1.json w2.json w4.json w8.json e2e.json --output bench/results/...json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from metrics import gap_closed as metrics_gap_closed  # noqa: E402
from result_files import write_pair  # noqa: E402

PROTOCOL = ("pattern", "scorer", "num_samples", "seq_len", "eval_samples")
LEARNED = ("learned window (exact)", "learned end_to_end (exact)")


def window_of(row: dict, args: dict, layers: int = 30) -> int:
    """The window size of a learned row: ``window_layers`` of its ``--set`` (default 4), or every layer."""
    if row["method"] == "learned end_to_end (exact)":
        return layers
    pairs = dict(pair.split("=", 1) for pair in args["set"])
    return int(pairs.get("window_layers", 4))


def points(results: list[dict]) -> tuple[list[dict], dict]:
    """Each learned row as a point of the curve, and the baselines by method."""
    protocol = {key: results[0]["args"][key] for key in PROTOCOL}
    rows, baselines = [], {}
    for result in results:
        if {key: result["args"][key] for key in PROTOCOL} != protocol:
            raise SystemExit(f"{result['args'].get('output')}: another protocol than {protocol}")
        for row in result["rows"]:
            if row["method"] in LEARNED:
                rows.append(row | {"window": window_of(row, result["args"])})
            else:
                baselines[row["method"]] = row
    return sorted(rows, key=lambda r: r["window"]), baselines | {"protocol": protocol}


def gap_closed(ppl: float, base: float, bound: float) -> float:
    """bench/metrics.py's gap closed (one seed: its medians are its values)."""
    return metrics_gap_closed(base, ppl, bound)


def markdown(rows: list[dict], baselines: dict) -> str:
    base, bound = baselines["2:4 no permutation"]["perplexity"], baselines["unstructured 50%"]["perplexity"]
    p = baselines["protocol"]
    lines = [
        f"SmolLM2-135M, {p['scorer']} {p['pattern']}, exact fold, calibration {p['num_samples']} x {p['seq_len']}, "
        f"evaluation {p['eval_samples']} x {p['seq_len']} tokens, seed {rows[0]['seed']}; 2:4 without permutation "
        f"{base:.2f}, unstructured 50% {bound:.2f}; gap closed in log perplexity",
        "",
        "| window K (decoder layers) | perplexity | gap closed | learning time (s) | peak RSS (GB) |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        k = f"{row['window']} (all: end_to_end)" if row["method"].startswith("learned end_to_end") else row["window"]
        gap = gap_closed(row["perplexity"], base, bound)
        lines.append(
            f"| {k} | {row['perplexity']:.2f} | {gap:.1%} | {row['seconds']:.0f} | {row['peak_rss_mb'] / 1000:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path, help="bench/quality.py result files, one seed")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    started = time.time()
    rows, baselines = points([json.loads(path.read_text()) for path in args.files])
    if {row["seed"] for row in rows} != {baselines["2:4 no permutation"]["seed"]}:
        raise SystemExit("the points and the baselines must come from one seed")
    table = markdown(rows, baselines)
    summary = [{"window": r["window"], "perplexity": r["perplexity"], "seconds": r["seconds"],
                "peak_rss_mb": r["peak_rss_mb"], "method": r["method"]} for r in rows]  # fmt: skip
    record = {"inputs": [str(p) for p in args.files], "baselines": baselines, "points": summary}
    seeds = sorted({row["seed"] for row in rows})
    write_pair(args.output, record, table, seeds=seeds, started=started, train_dtype=None, inputs=args.files)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
