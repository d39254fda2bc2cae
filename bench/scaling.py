"""Cost of learning one permutation site as the channel count and the block size grow.

For a synthetic Wanda-like score matrix (``rows`` x ``C_in``, heavy-tailed channel norms) it times
the heuristics (allocation, RIA-style assignment, swap search) and the learner (``retained``
objective, ``--steps`` steps, the per-step cost that every objective pays for the permutation
itself), each in a fresh process so its peak memory is its own, and writes
``bench/results/scaling-<time>.json`` with a per-step time model to project to larger layers.

    python bench/scaling.py
    python bench/scaling.py --channels 576 1536 --block-sizes 64
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import sys
import time
from pathlib import Path

from result_files import write_pair
from workers import run_worker

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
WORKER_TIMEOUT_S = 2 * 3600  # one method at one width (RIA-style at 11008 channels: about 130 s)
CHANNELS = [576, 1536, 2048, 4096, 8192, 11008]
BLOCK_SIZES = [16, 32, 64, 128, 256]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, nargs="+", default=CHANNELS)
    parser.add_argument("--block-sizes", type=int, nargs="+", default=BLOCK_SIZES)
    parser.add_argument("--rows", type=int, default=2048, help="output rows of the site's stacked linears")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (median reported)")
    parser.add_argument("--output", type=Path)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def worker(job: dict) -> dict:
    import torch

    from nmperm_plugin.core.nm import NMPattern
    from nmperm_plugin.core.permuter import BlockPermuter
    from nmperm_plugin.core.solvers import HEURISTICS
    from nmperm_plugin.learn.learner import EffectiveWeights, LearnConfig, Member, RetainedObjective, learn

    torch.set_num_threads(job["threads"])
    generator = torch.Generator().manual_seed(0)
    channels, rows, pattern = job["channels"], job["rows"], NMPattern(2, 4)
    norms = torch.empty(channels).exponential_(generator=generator) ** 2
    scores = torch.randn(rows, channels, generator=generator).abs() * norms
    scores /= scores.mean()
    times = []
    for _ in range(job["repeats"]):
        start = time.perf_counter()
        if job["method"] == "learned":
            init = HEURISTICS["allocation"](scores, pattern)
            permuter = BlockPermuter(init, job["block_size"], generator=generator)
            member = Member("site", scores, scores, "site")
            effective = EffectiveWeights([member], torch.nn.ModuleDict({"site": permuter}), {}, pattern)
            learn(effective, RetainedObjective([member], pattern), LearnConfig(steps=job["steps"], select_every=5))
        else:
            HEURISTICS[job["method"]](scores, pattern, generator)
        times.append(time.perf_counter() - start)
    return job | {
        "seconds": statistics.median(times),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def markdown(rows: list[dict]) -> str:
    lines = ["| method | C_in | block | seconds | peak RSS (MB) |", "|---|---|---|---|---|"]
    lines += [
        f"| {r['method']} | {r['channels']} | {r['block_size']} | {r['seconds']:.2f} | {r['peak_rss_mb']:.0f} |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    started = time.time()
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    base = {"rows": args.rows, "steps": args.steps, "repeats": args.repeats, "threads": 2, "block_size": 64}
    jobs = [
        base | {"method": m, "channels": c} for c in args.channels for m in ("allocation", "ria", "swap", "learned")
    ]
    jobs += [base | {"method": "learned", "channels": 4096, "block_size": b} for b in args.block_sizes if b != 64]
    output = args.output or RESULTS / f"scaling-{time.strftime('%Y%m%d-%H%M%S')}.json"
    rows = []
    for job in jobs:
        rows.append(run_worker(__file__, job, WORKER_TIMEOUT_S))
        print(
            f"{job['method']:<10} C_in {job['channels']:>6} block {job['block_size']:>4}: "
            f"{rows[-1]['seconds']:8.2f} s  peak {rows[-1]['peak_rss_mb']:7.0f} MB",
            flush=True,
        )
        fits = power_fits(rows)
        result = {"args": vars(args) | {"output": str(output)}, "rows": rows, "fits": fits, "projection": project(fits)}
        # after every job: a partial run keeps its rows
        write_pair(output, result, markdown(rows), seeds=[0], started=started)
    print(json.dumps({"fits": fits, "projection": result["projection"]}, indent=1))
    print("wrote", output)
    return 0


# decoder layer shapes (hidden, intermediate, layers) for the projection
MODELS = {"llama-2-7b": (4096, 11008, 32), "llama-2-70b": (8192, 28672, 80)}


def power_fits(rows: list[dict]) -> dict[str, dict]:
    """``seconds = a * C_in ** b`` per method (block 64), least squares in log-log space."""
    fits = {}
    for method in sorted({r["method"] for r in rows}):
        points = [(r["channels"], r["seconds"]) for r in rows if r["method"] == method and r["block_size"] == 64]
        if len(points) < 2:
            continue
        xs, ys = [math.log(c) for c, _ in points], [math.log(s) for _, s in points]
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
        fits[method] = {"a": math.exp(my - b * mx), "b": b, "max_measured_channels": max(c for c, _ in points)}
    return fits


def project(fits: dict[str, dict]) -> dict[str, dict]:
    """Per-model seconds for the sites of every decoder layer (gather mode: three hidden-wide sites and
    one intermediate-wide site per layer), from the fits; beyond the measured C_in it is an extrapolation."""
    out = {}
    for model, (hidden, intermediate, layers) in MODELS.items():
        out[model] = {}
        for method, fit in fits.items():
            per_layer = sum(fit["a"] * c ** fit["b"] for c in (hidden, hidden, hidden, intermediate))
            out[model][method] = {
                "seconds": per_layer * layers,
                "extrapolated": intermediate > fit["max_measured_channels"],
            }
    return out


if __name__ == "__main__":
    sys.exit(main())
