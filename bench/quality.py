"""Quality benchmark: learned permutations against heuristic baselines on SmolLM2-135M (offline).

For each method and seed it prunes the dense model in a fresh worker process (so peak memory is
the method's own), measures perplexity on held-out text and the retained-score ratio, and writes
``bench/results/quality-<time>.json`` and ``.md``, plus plots under ``bench/results/plots/`` where matplotlib
is installed (bench/results/ keeps only the files docs/results.md and its index cite).

Seeds change the calibration windows (drawn from ``builtin:wiki-calibration``) and the learner's
randomness; the evaluation windows (the first ``--eval-samples`` x ``--seq-len`` tokens of
``builtin:wiki-evaluation``, disjoint articles) are fixed. Headline figures (bench/metrics.py, on
each method's median perplexity across seeds; "paired by seed" is extra information):

* structural gap closed = (ln ppl_2:4 - ln ppl_method) / (ln ppl_2:4 - ln ppl_unstructured50)
* recovery             = (ln ppl_2:4 - ln ppl_method) / (ln ppl_2:4 - ln ppl_dense)

Every file carries bench/result_files.py's provenance stamp; a merged file keeps each input's.

    python bench/quality.py                                   # Wanda suite, 3 seeds, 2:4
    python bench/quality.py --suite objectives --seeds 0      # learned objectives side by side
    python bench/quality.py --pattern 4:8
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT / "bench"))  # loaded by path in tests/test_bench_configs.py

from metrics import median, recovery, share_closed  # noqa: E402
from result_files import write_pair  # noqa: E402
from workers import run_worker  # noqa: E402

PLOTS = RESULTS / "plots"
WORKER_TIMEOUT_S = 6 * 3600  # one method and seed; the slowest (gather end_to_end) takes about 20 minutes

# name -> PermuteConfig fields (None: the dense model, no pruning)
WANDA_SUITE = {
    "dense": None,
    "unstructured 50%": {"method": "identity", "unstructured": True, "fold": "gather"},
    "2:4 no permutation": {"method": "identity", "fold": "gather"},
    "allocation (gather)": {"method": "allocation", "fold": "gather"},
    "allocation (exact)": {"method": "allocation", "fold": "exact"},
    "RIA-style (gather)": {"method": "ria", "fold": "gather"},
    "RIA-style (exact)": {"method": "ria", "fold": "exact"},
    "swap (gather)": {"method": "swap", "fold": "gather"},
    "swap (exact)": {"method": "swap", "fold": "exact"},
    "learned (gather)": {"method": "learned", "objective": "layerwise", "fold": "gather"},
    "learned (exact)": {"method": "learned", "objective": "layerwise", "fold": "exact"},
    "learned retained (gather)": {"method": "learned", "objective": "retained", "fold": "gather"},
    "learned end_to_end (gather)": {"method": "learned", "objective": "end_to_end", "fold": "gather"},
    "learned end_to_end (exact)": {"method": "learned", "objective": "end_to_end", "fold": "exact"},
    "learned staged (gather)": {"method": "learned", "objective": "staged", "fold": "gather"},
    "learned staged (exact)": {"method": "learned", "objective": "staged", "fold": "exact"},
    "learned window (exact)": {"method": "learned", "objective": "window", "fold": "exact"},  # --set window_layers=K
}
OBJECTIVE_SUITE = {
    "2:4 no permutation": {"method": "identity", "fold": "gather"},
    "unstructured 50%": {"method": "identity", "unstructured": True, "fold": "gather"},
    "RIA-style (gather)": {"method": "ria", "fold": "gather"},
    "learned retained (gather)": {"method": "learned", "objective": "retained", "fold": "gather"},
    "learned layerwise (gather)": {"method": "learned", "objective": "layerwise", "fold": "gather"},
    "learned end_to_end (gather)": {"method": "learned", "objective": "end_to_end", "fold": "gather"},
}
SUITES = {"wanda": WANDA_SUITE, "objectives": OBJECTIVE_SUITE}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", choices=SUITES, default="wanda")
    parser.add_argument("--methods", nargs="*", help="a subset of the suite's method names")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--pattern", default="2:4", help="N:M pattern (e.g. 4:8)")
    parser.add_argument("--scorer", default="wanda")
    parser.add_argument("--num-samples", type=int, default=32, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--device", default="cpu", help="where the model runs (cpu, cuda)")
    parser.add_argument("--jobs", type=int, default=1, help="workers at once (1 on a small CPU machine)")
    parser.add_argument("--threads", type=int, help="torch threads per worker (default: CPU cores / jobs)")
    parser.add_argument("--eval-samples", type=int, default=24, help="evaluation windows")
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="FIELD=VALUE", help="PermuteConfig/LearnConfig overrides"
    )
    parser.add_argument("--output", type=Path, help="result file (default bench/results/quality-<time>.json)")
    parser.add_argument(
        "--from-json",
        type=Path,
        nargs="+",
        help="re-summarise earlier result files (no runs); several files of the same settings are merged into --output",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _overrides(pairs: list[str], objective: str | None) -> dict:
    """``--set FIELD=VALUE`` pairs as PermuteConfig fields. ``steps`` (the name of earlier result
    files) is the step field the row's objective reads: ``end_to_end_steps`` or ``steps_per_layer``."""
    fields = {}
    for pair in pairs:
        key, value = pair.split("=", 1)
        value = json.loads(value) if value[:1] in "0123456789-[{tf" else value
        if key == "steps":
            key = "end_to_end_steps" if objective == "end_to_end" else "steps_per_layer"
        fields[key] = value
    return fields


def method_config(fields: dict, pattern: str, scorer: str, pairs: list[str], seed: int = 0):
    """The ``PermuteConfig`` a suite method's ``fields`` resolve to under ``--set`` ``pairs``."""
    from nmperm_plugin import PermuteConfig

    overrides = _overrides(pairs, fields.get("objective"))
    return PermuteConfig(**(fields | {"pattern": pattern, "scorer": scorer, "seed": seed} | overrides))


def worker(job: dict) -> dict:
    """One method and seed in this process: prune, evaluate, report."""
    import torch

    from nmperm_plugin import permute_
    from nmperm_plugin.data.text import load_texts, token_windows
    from nmperm_plugin.eval.perplexity import perplexity
    from nmperm_plugin.io.models import default_model_path, load_model

    torch.set_num_threads(job["threads"])
    torch.manual_seed(job["seed"])
    model, tokenizer = load_model(default_model_path())
    model.to(job["device"])
    evaluation = token_windows(tokenizer, load_texts("builtin:wiki-evaluation"), job["eval_samples"], job["seq_len"])
    row = {"method": job["method"], "seed": job["seed"]}
    if job["config"] is not None:
        calibration = token_windows(
            tokenizer, load_texts("builtin:wiki-calibration"), job["num_samples"], job["seq_len"], seed=job["seed"]
        )
        config = method_config(job["config"], job["pattern"], job["scorer"], job["set"], job["seed"])
        start = time.monotonic()
        sidecar, result = permute_(model, calibration, config)
        row |= {
            "seconds": time.monotonic() - start,
            "retained_ratio": sidecar.figures["retained_ratio"],
            "retained_per_layer": result.retained,
            "history": result.history,
            "fold_error": sidecar.verification["fold_relative_logit_error"],
        }
    row["perplexity"] = perplexity(model, evaluation)
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if job["device"].startswith("cuda"):
        row["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return row


def summarise(rows: list[dict]) -> dict[str, dict]:
    """Median, min and max per method, and the gap figures against the same run's references."""
    by_method: dict[str, list[dict]] = {}
    for row in rows:
        by_method.setdefault(row["method"], []).append(row)

    def med(name: str, key: str = "perplexity") -> float | None:
        values = [r[key] for r in by_method.get(name, []) if r.get(key) is not None]
        return median(values) if values else None

    base, bound, dense = med("2:4 no permutation"), med("unstructured 50%"), med("dense")
    summary = {}
    for name, group in by_method.items():
        ppl = [r["perplexity"] for r in group]
        entry = {"seeds": len(group), "ppl_median": median(ppl), "ppl_min": min(ppl), "ppl_max": max(ppl)}
        for key in ("retained_ratio", "seconds", "peak_rss_mb"):
            entry[key] = med(name, key)
        if "unstructured" in name:
            entry["retained_ratio"] = 1.0  # by definition; the rows hold the N:M ratio of its statistics
        if base and bound:  # bench/metrics.py's gap closed: on the medians
            entry["gap_closed"] = share_closed(base, entry["ppl_median"], bound)
        if base and dense:
            entry["recovery"] = recovery(base, entry["ppl_median"], dense)
        paired = [gap_of(r, by_method) for r in group]
        paired = [g for g in paired if g is not None]
        entry["gap_closed_per_seed"] = median(paired) if paired else None  # extra information
        summary[name] = entry
    return summary


def gap_of(row: dict, by_method: dict[str, list[dict]]) -> float | None:
    """Structural gap closed by ``row`` against the 2:4 and unstructured rows of the same seed."""

    def same_seed(name: str) -> float | None:
        return next((r["perplexity"] for r in by_method.get(name, []) if r["seed"] == row["seed"]), None)

    base, bound = same_seed("2:4 no permutation"), same_seed("unstructured 50%")
    if base is None or bound is None:
        return None
    return share_closed(base, row["perplexity"], bound)


def markdown(summary: dict[str, dict], header: str) -> str:
    def fmt(value, spec):
        return "" if value is None else format(value, spec)

    lines = [
        header,
        "",
        "| method | ppl median | min | max | gap closed | gap closed, paired by seed | recovery | retained "
        "| perm. time (s) | peak RSS (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, e in summary.items():
        lines.append(
            f"| {name} | {e['ppl_median']:.2f} | {e['ppl_min']:.2f} | {e['ppl_max']:.2f} | "
            f"{fmt(e.get('gap_closed'), '.1%')} | {fmt(e.get('gap_closed_per_seed'), '.1%')} | "
            f"{fmt(e.get('recovery'), '.1%')} | "
            f"{fmt(e['retained_ratio'], '.4f')} | "
            f"{fmt(e['seconds'], '.0f')} | {fmt(e['peak_rss_mb'], '.0f')} |"
        )
    return "\n".join(lines) + "\n"


def plots(rows: list[dict], summary: dict[str, dict], stem: str) -> list[str]:
    try:
        import matplotlib
    except ImportError:  # plots are optional: the JSON and markdown tables are the results
        print("no plots: matplotlib is not installed (pip install matplotlib)")
        return []

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    names = list(summary)
    fig, ax = plt.subplots(figsize=(9, 4))
    med = [summary[n]["ppl_median"] for n in names]
    err = [
        [m - summary[n]["ppl_min"] for n, m in zip(names, med, strict=True)],
        [summary[n]["ppl_max"] - m for n, m in zip(names, med, strict=True)],
    ]
    ax.bar(range(len(names)), med, yerr=err, capsize=3, color="tab:blue")
    ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("perplexity (median, min-max over seeds)")
    ax.set_title("SmolLM2-135M, held-out Wikipedia")
    fig.tight_layout()
    written.append(_save(fig, f"{stem}-perplexity.png"))

    fig, ax = plt.subplots(figsize=(9, 4))
    for name in names:
        layer_rows = [r["retained_per_layer"] for r in rows if r["method"] == name and "retained_per_layer" in r]
        if layer_rows and "unstructured" not in name:
            layers = sorted(layer_rows[0], key=int)
            ax.plot([int(k) for k in layers], [layer_rows[0][k] for k in layers], label=name, marker=".")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("retained / unstructured bound")
    ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(_save(fig, f"{stem}-retained-per-layer.png"))

    learned = next((r for r in rows if r.get("history") and "learned" in r["method"]), None)
    if learned:
        fig, ax = plt.subplots(figsize=(9, 4))
        for key in list(learned["history"])[:: max(1, len(learned["history"]) // 6)]:
            history = learned["history"][key]
            points = [(h["step"], h["select"] / history[0]["select"]) for h in history if h["select"] is not None]
            ax.plot(*zip(*points, strict=True), marker=".", label=key)
        ax.set_xlabel("step")
        ax.set_ylabel("selection loss / heuristic start")
        ax.set_title(f"learning curves ({learned['method']}, seed {learned['seed']})")
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(_save(fig, f"{stem}-learning-curve.png"))
    return written


def _save(fig, name: str) -> str:
    PLOTS.mkdir(parents=True, exist_ok=True)
    path = PLOTS / name
    fig.savefig(path, dpi=110)
    return str(path.relative_to(ROOT))


SAME_SETTINGS = ("pattern", "scorer", "num_samples", "seq_len", "eval_samples", "set")


def header_of(args: dict) -> str:
    return (
        f"SmolLM2-135M, {args['scorer']} {args['pattern']}, calibration {args['num_samples']} x {args['seq_len']} "
        f"tokens, evaluation {args['eval_samples']} x {args['seq_len']} tokens, seeds {args['seeds']}"
    )


def effective_overrides(result: dict) -> list[str]:
    """The ``--set`` pairs of a result file that change one of its rows' configuration under the
    current defaults (e.g. ``steps=120`` on gather end_to_end rows changes nothing once that is the default)."""
    args, suite = result["args"], SUITES[result["args"].get("suite", "wanda")]

    def resolved(method: str, pairs: list[str]):
        return None if suite[method] is None else method_config(suite[method], args["pattern"], args["scorer"], pairs)

    methods = {row["method"] for row in result["rows"]}
    return [pair for pair in args["set"] if any(resolved(m, [pair]) != resolved(m, []) for m in methods)]


def requested_train_dtype(pairs: list[str]) -> str:
    """The ``train_dtype`` a run's ``--set`` pairs ask for (``auto``, the default, if none)."""
    return next((pair.split("=", 1)[1] for pair in pairs if pair.startswith("train_dtype=")), "auto")


def resummarise(paths: list[Path], output: Path | None) -> int:
    """Summary, table and plots again from result files; several files (same settings) merge into ``output``."""
    started = time.time()
    results = [json.loads(path.read_text()) for path in paths]
    if len(results) > 1 and output is None:
        raise SystemExit("merging several result files needs --output for the merged file")
    first, first_overrides = results[0]["args"], effective_overrides(results[0])
    for path, result in zip(paths, results, strict=True):
        differ = [key for key in SAME_SETTINGS if result["args"].get(key) != first.get(key)]
        if differ == ["set"] and effective_overrides(result) == first_overrides:
            differ = []  # the overrides that differ are the current defaults for these rows
        if differ:
            raise SystemExit(f"{path} was run with other {differ} than {paths[0]}: its rows are not comparable")
    rows = [row for result in results for row in result["rows"]]
    seeds = sorted({row["seed"] for row in rows})
    args = first | {"seeds": seeds, "merged_from": [str(path) for path in paths]}
    output = output or paths[0]
    summary = summarise(rows)
    write_pair(
        output,
        {"args": args, "summary": summary, "rows": rows},
        markdown(summary, header_of(args)),
        seeds=seeds,
        started=started,
        train_dtype=None,  # no learning here: each input's stamp holds its own
        inputs=paths,
    )
    print(markdown(summary, header_of(args)))
    for path in plots(rows, summary, output.stem):
        print("plot:", path)
    return 0


def main(argv: list[str] | None = None) -> int:
    started = time.time()
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if args.from_json:
        return resummarise(args.from_json, args.output)
    from tqdm.auto import tqdm

    suite = SUITES[args.suite]
    names = args.methods or list(suite)
    unknown = set(names) - set(suite)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; the {args.suite} suite has {list(suite)}")
    jobs = [
        {
            "method": name,
            "config": suite[name],
            "seed": seed,
            "pattern": args.pattern,
            "scorer": args.scorer,
            "num_samples": args.num_samples,
            "seq_len": args.seq_len,
            "eval_samples": args.eval_samples,
            "set": args.set,
            "device": args.device,
            "threads": args.threads or max(1, (os.cpu_count() or 1) // args.jobs),
        }
        for seed in args.seeds
        for name in names
        if suite[name] is not None or seed == args.seeds[0]  # the dense model needs one evaluation
    ]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    output = args.output or RESULTS / f"quality-{args.suite}-{args.pattern.replace(':', 'of')}-{stamp}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    pool = ThreadPoolExecutor(args.jobs)
    results = pool.map(partial(run_worker, __file__, timeout_s=WORKER_TIMEOUT_S), jobs)
    for job, row in tqdm(zip(jobs, results, strict=True), total=len(jobs), desc="benchmark"):
        rows.append(row)
        tqdm.write(f"{job['method']:<28} seed {job['seed']}: ppl {rows[-1]['perplexity']:.2f}")
        summary = summarise(rows)
        header = header_of(vars(args))
        result = {"args": vars(args) | {"output": str(output)}, "summary": summary, "rows": rows}
        write_pair(  # rewritten after every job: a partial run keeps its rows
            output,
            result,
            markdown(summary, header),
            seeds=args.seeds,
            started=started,
            train_dtype=requested_train_dtype(args.set),
            device=args.device,
        )
    print(markdown(summary, header))
    for path in plots(rows, summary, output.stem):
        print("plot:", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
