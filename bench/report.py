"""docs/results.md from the result files in bench/results/: every figure computed here, from the files.

    python bench/report.py                 # writes docs/results.md
    python bench/report.py --check         # exit 1 if docs/results.md is not what the files give

A compact page of the current tables: each names its protocol in one line and each row links the file
it comes from (reference links, each target written once); medians (min-max where it matters), the
per-seed rows staying in each result file's own .md. The gap closed is bench/metrics.py's, defined in
docs/method.md#gap-closed and linked from the page. Files not tabled here are listed in the index,
bench/results/README.md. The published anchors (SPEC section 8) are the only figures typed here, in
:data:`ANCHORS`, with their sources. No torch needed.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from metrics import (  # noqa: E402
    PENALTY_DEFINITION,
    gap_closed,
    gap_closed_of_medians,
    penalty_fraction,
    recovery,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
OUTPUT = ROOT / "docs" / "results.md"

RECIPE_5SEEDS = "recipes-wanda-2of4-e2e-epochs-fp32-amd-5seeds.json"
RECIPE_PIPELINE = "quality-wanda-2of4-e2e-exact-3seeds-start.json"
RECIPE_SPARSEGPT = "recipes-smollm2-2of4-sparsegpt-3seeds.json"
RECIPE_OTHER_TEXT = "recipes-smollm2-2of4-sparsegpt-lambada.json"
RECIPE_ROWS = {  # bench/recipes.py's variants, in its order
    "wanda": "Wanda 2:4",
    "wanda-unstructured": "Wanda unstructured 50%",
    "wanda+learned": "learned, then Wanda 2:4 (`wanda-2of4-learned.yaml`)",
    "sparsegpt": "SparseGPT 2:4",
    "sparsegpt-unstructured": "SparseGPT unstructured 50%",
    "sparsegpt+learned": "learned, then SparseGPT 2:4 (its own masks)",
    "learned+reconstruct": "learned, reconstructed, distilled (`sparsegpt-2of4-learned.yaml`)",
}
Q_DEFAULT = "quality-wanda-2of4-e2e-default-3seeds.json"
Q_GATHER_5 = "quality-wanda-2of4-e2e-gather-default-5seeds.json"
Q_ALL = "quality-wanda-2of4-all-methods-3seeds.json"
Q_SPARSEGPT = "quality-sparsegpt-2of4-exact-3seeds.json"
Q_4OF8 = "quality-wanda-4of8-seed0.json"
WINDOW_CURVE = "window-curve-wanda-2of4-seed0.json"
ZEROSHOT = ("zeroshot-wanda-2of4-limit100.json", "zeroshot-sparsegpt-2of4-limit100.json")
ARCHITECTURES = ("architectures-random-configs.json", "architectures-timm-vit-random-config.json")
EXPORT = "export-smollm2-demo-cpu.txt"
GPU = ("gpu-h200/serve_speed-linears-norms.json", "gpu-h200/serve_speed-linears-compiled.json")
GPU_CHECK = "gpu-h200/serve_speed-model-check.json"
GPU_ENV = "gpu-h200/environment.txt"
GPU_TESTS = "gpu-h200/pytest-export-after-fix.txt"
LEARN_SPEED = "learn-speed-cpu2-buffered.json"
SCALING = "scaling-cpu2.json"
START = "start-scaling-cpu2.json"
START_EXACT = "start-exact-70b-cpu2.json"  # the 70B sites against the exact solver
HARDENING = "hardening-cpu.json"
E2E_SCALING = ("e2e-scaling-cpu.json", "e2e-scaling-cpu-bf16.json")
DISTRIBUTED = ("distributed-cpu2-smollm2.json", "distributed-cpu2-smollm2-4x512.json")
IMAGE_VIT = ("image-vit-digits-2of4-3seeds.json", "image-vit-digits-2of4-3seeds-amd-host.json")

BASE, UNSTRUCTURED, DENSE = "2:4 no permutation", "unstructured 50%", "dense"

# SPEC section 8: published WikiText-2 perplexities (source, model, dense, Wanda 2:4, heuristic permutation
# and its name, learned permutation). Typed from the papers; everything derived from them is computed.
ANCHORS = (
    ("arXiv 2601.22980", "LLaMA-3.2-1B", 9.06, 75.76, (68.17, "CP"), 45.32),
    ("arXiv 2601.22980", "LLaMA-2-7B", 5.12, 11.38, (10.52, "RIA"), 10.17),
    ("PermLLM (NeurIPS 2025)", "LLaMA-2-7B", 5.47, 12.16, (11.00, "RIA CP"), 9.39),
)


def load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def link(name: str, text: str | None = None) -> str:
    """A relative link from docs/results.md to a result file."""
    return f"[{text or Path(name).name}](../bench/results/{name})"


def pct(value: float | None, digits: int = 1) -> str:
    return "" if value is None else f"{100 * value:.{digits}f}%"


def num(value: float | None, spec: str = ".2f") -> str:
    return "" if value is None else format(value, spec)


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


# --- readers ---------------------------------------------------------------------------------------------


def quality_rows(name: str) -> dict[str, dict[int, dict]]:
    """bench/quality.py file: method -> seed -> row."""
    by_method: dict[str, dict[int, dict]] = {}
    for row in load(name)["rows"]:
        by_method.setdefault(row["method"], {})[row["seed"]] = row
    return by_method


def ppl(rows: dict[int, dict]) -> dict[int, float]:
    return {seed: row["perplexity"] for seed, row in rows.items()}


def recipe_rows(name: str) -> tuple[dict[str, dict[int, dict]], dict[int, float]]:
    """A merged bench/recipes.py file: variant -> seed -> row (a later file's row replaces an earlier
    one's, as ``recipes.py --from-json`` merges), and the dense perplexity per seed."""
    by_variant: dict[str, dict[int, dict]] = {}
    dense: dict[int, float] = {}
    for run in load(name)["runs"]:
        seed = run_seed(run)
        dense[seed] = run["dense_perplexity"]
        for variant in run["variants"]:
            by_variant.setdefault(variant["variant"], {})[seed] = variant
    return by_variant, dense


def run_seed(run: dict) -> int:
    """A bench/recipes.py run's seed (older files name it only in their calibration text)."""
    return int(run.get("seed", run["calibration"].rsplit("seed ", 1)[1].rstrip(")")))


def median(values) -> float:
    return statistics.median(list(values))


# --- sections --------------------------------------------------------------------------------------------


def spread(values, spec: str = ".2f") -> str:
    """``median (min-max)`` of ``values``; the median alone when they are all the same."""
    values = list(values)
    lo, hi = min(values), max(values)
    return num(median(values), spec) + ("" if lo == hi else f" ({lo:{spec}}-{hi:{spec}})")


def seed_range(seeds) -> str:
    seeds = sorted(seeds)
    contiguous = seeds == list(range(seeds[0], seeds[-1] + 1))
    return str(seeds[0]) if len(seeds) == 1 else f"{seeds[0]}-{seeds[-1]}" if contiguous else ",".join(map(str, seeds))


def steps_of(rows: dict[int, dict]) -> str:
    """The learning steps of a learned row's runs, from their recorded history."""
    counts = {max(e["step"] for h in r["history"].values() for e in h) for r in rows.values() if r.get("history")}
    return "/".join(map(str, sorted(counts)))


def recipe_section(headline: dict) -> list[str]:
    data = load(RECIPE_5SEEDS)
    rows, dense = recipe_rows(RECIPE_5SEEDS)
    first = data["runs"][0]
    base, bound, learned = (ppl(rows[v]) for v in ("wanda", "wanda-unstructured", "wanda+learned"))
    gap = gap_closed_of_medians(base.values(), learned.values(), bound.values())
    pipe_rows = quality_rows(RECIPE_PIPELINE)["learned end_to_end (exact)"]
    pipe = ppl(pipe_rows)
    same = sorted(pipe)
    gap3 = gap_closed_of_medians(*([p[s] for s in same] for p in (base, learned, bound)))
    pipe_gap = gap_closed_of_medians([base[s] for s in same], pipe.values(), [bound[s] for s in same])
    headline.update(recipe_5seeds=gap, recipe_seeds_0_2=gap3, pipeline_seeds_0_2=pipe_gap)
    learning = [r["permutation_seconds"] for r in rows["wanda+learned"].values()]
    file = link(RECIPE_5SEEDS, "json")
    ends = [gap_closed_of_medians(base.values(), row.values(), bound.values()) for row in (base, bound)]
    body = [
        ["dense", seed_range(dense), spread(dense.values()), "", "", file],
        ["Wanda 2:4", seed_range(base), spread(base.values()), pct(ends[0]), "", file],
        ["Wanda unstructured 50%", seed_range(bound), spread(bound.values()), pct(ends[1]), "", file],
        [
            "Wanda 2:4 + learned permutation (the recipe)",
            seed_range(learned),
            f"**{spread(learned.values())}**",
            f"**{pct(gap)}**",
            spread(learning, ".0f"),
            file,
        ],
        [
            "the same learner through `permute_` (`nmperm prune`)",
            seed_range(pipe),
            spread(pipe.values()),
            f"{pct(pipe_gap)} (the recipe, seeds {seed_range(same)}: {pct(gap3)})",
            spread([r["seconds"] for r in pipe_rows.values()], ".0f"),
            link(RECIPE_PIPELINE, "json"),
        ],
    ]
    return [
        "## The llm-compressor recipe: Wanda 2:4 with the learned permutation",
        "",
        f"Protocol: {first['model']} through `llmcompressor.oneshot` with `recipes/wanda-2of4-learned.yaml` at "
        f"its defaults, {first['calibration'].split(' (seed')[0]} drawn by the seed, perplexity on the "
        f"{first['evaluation']}, {first['machine']['threads']} CPU threads; median (min-max) over seeds. The "
        "`permute_` row is `bench/quality.py` on the same protocol (learned rows only: its gap is taken against "
        "the recipe's Wanda rows of its seeds).",
        "",
        *table(["row", "seeds", "perplexity", "gap closed", "learning (s)", "file"], body),
        "",
    ]


def verification(quantized: dict[int, dict]) -> str:
    """``nmperm verify`` on each seed's quantized checkpoint: passed, or the first failed check."""
    if all(q["verified"] for q in quantized.values()):
        return "`nmperm verify` passed" + ("" if len(quantized) == 1 else " every seed")
    parts = []
    for seed, q in sorted(quantized.items()):
        failed = next((c for c in q["checks"] if not c["ok"]), None)
        parts.append(
            f"seed {seed}: " + ("passed" if failed is None else f"failed '{failed['check']}': {failed['detail'][:40]}")
        )
    return "`nmperm verify` " + "; ".join(parts)


def sparsegpt_table(name: str, headline: dict, key: str, borrowed: str | None = None) -> list[str]:
    """One bench/recipes.py merged file as a table: perplexity, penalty as a share of SparseGPT 2:4's
    (on the medians; whether the row beats SparseGPT on every seed), the quantized rows; a variant the
    file lacks is taken from ``borrowed`` (the same protocol) for the same seeds, linked to it."""
    rows, dense = recipe_rows(name)
    reference = ppl(rows["sparsegpt"])
    files = {variant: link(name, "json") for variant in rows}
    if borrowed:  # rows measured on the same protocol in an earlier file: its runs of this table's seeds
        earlier, _ = recipe_rows(borrowed)
        for variant in RECIPE_ROWS:
            if variant not in rows and variant in earlier:
                rows[variant] = {s: r for s, r in earlier[variant].items() if s in dense}
                files[variant] = link(borrowed, "json")
    body = [["dense", seed_range(dense), spread(dense.values()), "", "", "", link(name, "json")]]
    for variant, label in RECIPE_ROWS.items():
        if variant not in rows:
            continue
        file = files[variant]
        values = ppl(rows[variant])
        seeds = sorted(values)
        fraction = penalty_fraction(
            median(values.values()), median(reference[s] for s in seeds), median(dense[s] for s in seeds)
        )
        beats = all(values[s] < reference[s] for s in seeds) if variant != "sparsegpt" else None
        seconds = spread([r["oneshot_seconds"] for r in rows[variant].values()], ".0f")
        bold = variant == "learned+reconstruct"
        cells = [f"**{spread(values.values())}**" if bold else spread(values.values())]
        cells.append(f"**{fraction:.3f}**" if bold else f"{fraction:.3f}")
        body.append(
            [label, seed_range(seeds), *cells, "" if beats is None else "yes" if beats else "no", seconds, file]
        )
        if variant == "learned+reconstruct":
            headline[key] = fraction
        for scheme in sorted({q["scheme"] for r in rows[variant].values() for q in r.get("quantized", [])}):
            quantized = {
                s: q for s, r in rows[variant].items() for q in r.get("quantized", []) if q["scheme"] == scheme
            }
            qs = sorted(quantized)
            fraction = penalty_fraction(
                median(q["perplexity"] for q in quantized.values()),
                median(reference[s] for s in qs),
                median(dense[s] for s in qs),
            )
            verified = verification(quantized)
            body.append([
                f"`{scheme}.yaml`, quantized ({verified})", seed_range(qs),
                spread(q["perplexity"] for q in quantized.values()), f"{fraction:.3f}", "", "", file,
            ])  # fmt: skip
    return table(["row", "seeds", "perplexity", "penalty / SparseGPT 2:4's", "beats SparseGPT every seed",
                  "oneshot (s)", "file"], body)  # fmt: skip


def cross_text_table(name: str) -> list[str]:
    """The rows of ``name`` (:func:`recipe_rows`) that also evaluated on another text
    (``--also-evaluate``): each variant's median perplexity there over the seeds where SparseGPT 2:4
    did too, and its penalty as a share of SparseGPT's on the medians."""
    rows, _ = recipe_rows(name)
    dense: dict[str, dict[int, float]] = {}  # text -> seed -> the dense model's perplexity there
    for run in load(name)["runs"]:
        for text, value in (run.get("dense_other_perplexity") or {}).items():
            dense.setdefault(text, {})[run_seed(run)] = value

    def there(variant: str, text: str) -> dict[int, float]:
        return {
            s: r["other_perplexity"][text]
            for s, r in rows.get(variant, {}).items()
            if text in (r.get("other_perplexity") or {})
        }

    body = []
    for text in sorted(dense):
        reference = there("sparsegpt", text)
        if reference:
            body.append(
                [
                    f"dense (on `{Path(text).name}`)",
                    seed_range(reference),
                    spread(dense[text][s] for s in reference),
                    "0",
                ]
            )
        for variant, label in RECIPE_ROWS.items():
            values = {s: v for s, v in there(variant, text).items() if s in reference}
            if not values:
                continue
            fraction = penalty_fraction(
                median(values.values()), median(reference[s] for s in values), median(dense[text][s] for s in values)
            )
            body.append([label, seed_range(values), spread(values.values()), f"{fraction:.3f}"])
    return table(["row", "seeds", "perplexity", "penalty / SparseGPT 2:4's"], body) if body else []


def bare(text: str) -> str:
    """``text`` with every absolute path shown by its file name (a run's temporary directory says nothing)."""
    return re.sub(r"/\S*/(\S+)", r"`\1`", text)


def sparsegpt_section(headline: dict) -> list[str]:
    first = load(RECIPE_SPARSEGPT)["runs"][0]
    other = load(RECIPE_OTHER_TEXT)["runs"][0]
    return [
        "## Against SparseGPT: the best 2:4 model through llm-compressor",
        "",
        f"Protocol: {first['model']} through `llmcompressor.oneshot`, stock pruners and the shipped recipes at their "
        f"defaults, {first['calibration'].split(' (seed')[0]} drawn by the seed, perplexity on the "
        f"{first['evaluation']}, {first['machine']['threads']} CPU threads; median (min-max) over seeds. "
        f"**Penalty**: {PENALTY_DEFINITION}, here against SparseGPT 2:4 on the medians (1.00: SparseGPT's own "
        "cost; 0: the dense model). A row linked to another file: that file's runs of these seeds.",
        "",
        *sparsegpt_table(RECIPE_SPARSEGPT, headline, "sparsegpt_penalty_fraction", borrowed=RECIPE_5SEEDS),
        "",
        f"The same on text outside the repository's corpus: {bare(other['calibration'].split(' (seed')[0])}, "
        f"perplexity on the {bare(other['evaluation'])} (LAMBADA's passages, by "
        "`bench/lambada_text.py`).",
        "",
        *sparsegpt_table(RECIPE_OTHER_TEXT, headline, "other_text_penalty_fraction"),
        "",
        f"Calibrated on the first table's text and evaluated on the second's ({link(RECIPE_SPARSEGPT, 'json')}, the "
        "runs that also evaluated there): what a user gets on text unlike the calibration data.",
        "",
        *cross_text_table(RECIPE_SPARSEGPT),
        "",
    ]


def pipeline_section(headline: dict) -> list[str]:
    dense = median(ppl(quality_rows(Q_ALL)[DENSE]).values())
    args = load(Q_DEFAULT)["args"]
    body = []
    for name, fold in (
        (Q_DEFAULT, "gather"),
        (Q_DEFAULT, "exact"),
        (Q_GATHER_5, "gather"),
        (Q_SPARSEGPT, "exact"),
        (Q_4OF8, "gather"),
    ):
        a = load(name)["args"]
        if (a["num_samples"], a["seq_len"], a["eval_samples"]) != (
            args["num_samples"],
            args["seq_len"],
            args["eval_samples"],
        ):
            raise ValueError(f"{name} is not on the {args['num_samples']} x {args['seq_len']} protocol")
        by_method = quality_rows(name)
        base, bound = ppl(by_method[BASE]), ppl(by_method[UNSTRUCTURED])
        ria, learned_rows = by_method[f"RIA-style ({fold})"], by_method[f"learned end_to_end ({fold})"]
        learned = ppl(learned_rows)
        closed = [gap_closed_of_medians(base.values(), ppl(r).values(), bound.values()) for r in (ria, learned_rows)]
        if name == Q_DEFAULT:
            headline[f"quality_{fold}"] = closed[1]
        body.append(
            [
                f"{a['scorer']} {a['pattern']}, {fold}",
                seed_range(learned),
                steps_of(learned_rows),
                num(median(base.values())),
                num(median(bound.values())),
                num(median(ppl(ria).values())),
                f"**{num(median(learned.values()))}**",
                f"{pct(closed[0])}, **{pct(closed[1])}**",
                num(median(r["seconds"] for r in learned_rows.values()), ".0f"),
                link(name, "json"),
            ]
        )
    header = [
        "pruner, fold",
        "seeds",
        "steps",
        "no permutation",
        "unstructured",
        "RIA-style",
        "learned end_to_end",
        "gap closed: RIA-style, learned",
        "learning (s)",
        "file",
    ]
    return [
        f"## The pipeline (`permute_`, `nmperm prune`) on the {args['num_samples']} x {args['seq_len']} protocol",
        "",
        f"Protocol: SmolLM2-135M, `bench/quality.py` (each method and seed in its own process), "
        f"{args['num_samples']} x {args['seq_len']} calibration tokens drawn by the seed, perplexity on the first "
        f"{args['eval_samples']} x {args['seq_len']} tokens of `builtin:wiki-evaluation` (dense {dense:.2f}, "
        f"{link(Q_ALL, 'json')}); medians over seeds; steps: the learner's, as recorded. SparseGPT here is its "
        "saliency without the weight update.",
        "",
        *table(header, body),
        "",
    ]


def objectives_section() -> list[str]:
    by_method = quality_rows(Q_ALL)
    base, bound = ppl(by_method[BASE]), ppl(by_method[UNSTRUCTURED])
    steps = steps_of(by_method["learned end_to_end (gather)"])
    body = []
    for method, rows in by_method.items():
        if method in (DENSE, BASE, UNSTRUCTURED):
            continue
        values = ppl(rows)
        body.append(
            [
                method,
                seed_range(values),
                num(median(values.values())),
                pct(gap_closed_of_medians(base.values(), values.values(), bound.values())),
                num(median(r["seconds"] for r in rows.values()), ".0f"),
                link(Q_ALL, "json"),
            ]
        )
    curve = load(WINDOW_CURVE)
    cb, cu = (curve["baselines"][k]["perplexity"] for k in (BASE, UNSTRUCTURED))
    points = ", ".join(
        f"K = {p['window']} {pct(gap_closed(cb, p['perplexity'], cu))} ({p['seconds']:.0f} s)" for p in curve["points"]
    )
    return [
        f"## Objectives compared (Wanda 2:4; end_to_end and staged at {steps} steps, the earlier default)",
        "",
        f"Protocol: as above; no permutation {num(median(base.values()))}, unstructured "
        f"{num(median(bound.values()))}; `learned` alone is the `layerwise` objective.",
        "",
        *table(["method", "seeds", "perplexity", "gap closed", "learning (s)", "file"], body),
        "",
        f"The `window` objective against its window size K (seed {curve['baselines'][BASE]['seed']}, exact, "
        f"`--set window_layers=K`; K = {curve['points'][-1]['window']} is end_to_end), gap closed against the "
        f"same seed's baselines: {points} ({link(WINDOW_CURVE, 'json')}).",
        "",
    ]


def anchors_section(headline: dict) -> list[str]:
    body = []
    for source, model, dense, wanda, (heuristic, name), learned in ANCHORS:
        rh, rl = recovery(wanda, heuristic, dense), recovery(wanda, learned, dense)
        body.append(
            [
                source,
                model,
                f"{dense:.2f}",
                f"{wanda:.2f}",
                f"{heuristic:.2f} {name} ({pct(rh)})",
                f"{learned:.2f} ({pct(rl)})",
            ]
        )
    rows, args = quality_rows(Q_DEFAULT), load(Q_DEFAULT)["args"]
    dense = median(ppl(quality_rows(Q_ALL)[DENSE]).values())
    wanda = median(ppl(rows[BASE]).values())
    for fold in ("gather", "exact"):
        heuristic = median(ppl(rows[f"RIA-style ({fold})"]).values())
        learned = median(ppl(rows[f"learned end_to_end ({fold})"]).values())
        rh, rl = recovery(wanda, heuristic, dense), recovery(wanda, learned, dense)
        body.append(
            [
                f"this project, {fold} ({link(Q_DEFAULT, 'json')})",
                "SmolLM2-135M",
                f"{dense:.2f}",
                f"{wanda:.2f}",
                f"{heuristic:.2f} RIA-style ({pct(rh)})",
                f"{learned:.2f} ({pct(rl)})",
            ]
        )
    return [
        "## Published anchors (SPEC section 8)",
        "",
        "WikiText-2 perplexities from the papers (typed in `bench/report.py`, `ANCHORS`) beside this project's "
        f"medians on the {args['num_samples']} x {args['seq_len']} protocol (Wikipedia text); recovery computed "
        "here. Compare within a row only: models, context lengths and calibration differ.",
        "",
        *table(["source", "model", "dense", "Wanda 2:4", "heuristic (recovery)", "learned (recovery)"], body),
        "",
    ]


def zeroshot_section() -> list[str]:
    body, tasks = [], set()
    settings = load(ZEROSHOT[0])["settings"]
    for name in ZEROSHOT:
        scorer = name.split("-")[1]
        for method, e in load(name)["summary"].items():
            signal = e["signal"]
            tasks.add(", ".join(signal.get("tasks", [])))
            body.append(
                [
                    f"{scorer}: {method}",
                    seed_range(e["seeds"]),
                    f"{e['all']['mean_acc']:.3f} ± {e['all']['mean_acc_stderr']:.3f}",
                    num(signal.get("mean_acc"), ".3f"),
                    pct(signal.get("recovered"), 0),
                    num(e["perplexity"], ".1f"),
                    link(name, "json"),
                ]
            )
    signal = f"({tasks.pop()})" if len(tasks) == 1 else "(per file)"
    return [
        f"## Zero-shot accuracy (lm-eval, first {settings['limit']} documents per task)",
        "",
        f"Protocol: `bench/zeroshot.py --limit {settings['limit']}`, {len(settings['tasks'])} tasks with lm-eval's "
        f"prompts on local data; signal tasks {signal} are those where dense beats guessing by more than two "
        "standard errors; recovered = (mean - mean_2:4) / (mean_dense - mean_2:4) on them.",
        "",
        *table(
            [
                "row",
                "seeds",
                f"mean acc ({len(settings['tasks'])} tasks)",
                "signal mean",
                "recovered",
                "perplexity",
                "file",
            ],
            body,
        ),
        "",
    ]


def architectures_section() -> list[str]:
    body = []
    for name in ARCHITECTURES:
        rows = load(name)["rows"]
        gather = [r["fold_error"]["gather"] for r in rows]
        runs = [run for r in rows for run in r["runs"].values()]
        refused = [r["family"] for r in rows if r["fold_error"]["gather"] is None]
        body.append(
            [
                str(len(rows)),
                f"{max(r['fold_error']['exact'] for r in rows):.1e}",
                f"{max(g for g in gather if g is not None):.1e}"
                + (f" (refused: {', '.join(refused)})" if refused else ""),
                f"{sum(r['nm_linears'] for r in runs)}/{sum(r['linears'] for r in runs)}",
                f"{sum(r['verify'] == 'passed' for r in runs)}/{len(runs)}",
                link(name, "json"),
            ]
        )
    return [
        "## Architectures (tiny random configs: fold exactness and 2:4, no quality)",
        "",
        "Protocol: `bench/architectures.py`, every supported family on a tiny random config, float32; fold error = "
        "largest logit difference relative to the logits' scale after folding random permutations; the learned "
        "and RIA runs in both folds. Per family in each file's `.md`.",
        "",
        *table(["configs", "worst fold error, exact", "gather", "2:4 linears", "verify passed", "file"], body),
        "",
    ]


def export_section() -> list[str]:
    text = (RESULTS / EXPORT).read_text()
    found = re.search(r"(\d+) converted, (\d+) ready, (\d+) left dense", text)
    converted, ready, left = (int(g) for g in found.groups()) if found else (None, None, None)
    exact = sum(1 for line in text.splitlines() if re.search(r"\bready\s+exact\b", line))
    check = load(GPU_CHECK)["model_check"]
    env = (RESULTS / GPU_ENV).read_text()
    found_env = (
        re.search(r"^gpu (.+)$", env, re.M),
        re.search(r"^torch (\S+)", env, re.M),
        re.search(r"torchao (\S+)", env),
    )
    gpu, torch_v, torchao_v = (m.group(1) if m else "?" for m in found_env)
    passed = re.search(r"(\d+) passed", (RESULTS / GPU_TESTS).read_text())
    body = []
    for name in GPU:
        rows = load(name)["linear"]
        for key, label in (
            ("speedup_sparse_cusparselt_over_dense_bf16", "cuSPARSELt bf16 2:4 / dense bf16, eager"),
            ("speedup_sparse_cusparselt_compiled_over_dense_bf16_compiled", "the same, compiled"),
            ("speedup_fp8_sparse_over_fp8_dense", "FP8 2:4 / FP8 dense"),
        ):
            values = [r[key] for r in rows if r.get(key) is not None]
            if values:
                body.append([label, str(len(values)), f"{spread(values)}x", link(name, "json")])
    return [
        "## Export and serving",
        "",
        f"`nmperm demo`, then `nmperm export nmperm-demo-output --to torchao --dtype bf16 --check` on a CPU: {ready} "
        f"linears ready for cuSPARSELt ({exact} with an exact round trip), {converted} converted (no GPU), {left} "
        f"left dense ({link(EXPORT, 'txt')}). On {gpu} (torch {torch_v}, torchao {torchao_v}, "
        f"{link(GPU_ENV, 'txt')}): `tests/test_export.py` passed {passed.group(1) if passed else '?'} tests "
        f"({link(GPU_TESTS, 'txt')}); a SmolLM2-shaped 2:4 model converted to cuSPARSELt bf16 "
        f"({check['export']['counts']['converted']} linears) gives the dense model's greedy tokens: "
        f"{check['same_tokens']} ({link(GPU_CHECK, 'json')}). Per linear (speed-up = dense time / sparse time):",
        "",
        *table(["speed-up", "shapes x tokens", "median (min-max)", "file"], body),
        "",
    ]


def cost_section() -> list[str]:
    speed = load(LEARN_SPEED)["end_to_end"]
    fits = load(SCALING)
    scaling = [
        [
            method,
            f"{fit['b']:.2f}",
            f"{fits['projection']['llama-2-7b'][method]['seconds']:.0f}",
            f"{fits['projection']['llama-2-70b'][method]['seconds']:.0f}",
            link(SCALING, "json"),
        ]
        for method, fit in fits["fits"].items()
        if method not in ("ria", "swap")  # the start's solver as it scales: the START table
    ]
    start, exact = load(START), load(START_EXACT)["shapes"]

    def vs_exact(name: str, row: dict, site: str) -> str:
        found = row.get(site) or exact.get(name, {}).get(site)
        return f"{found['retained_current_over_exact']:.5f}" if found else "-"

    starts = [
        [
            name,
            f"{row['time']['all_sites_s']:.0f}",
            "all" if row["time"]["all_sites_measured"] else f"{row['time']['timed_layers']} layers, rest counted",
            f"{statistics.median(row['time']['mlp_out_s_per_site']):.1f}",
            f"{row['time']['hidden_s']:.1f}",
            vs_exact(name, row, "mlp_out_vs_exact"),
            vs_exact(name, row, "hidden_vs_exact"),
            link(START, "json") + (", " + link(START_EXACT, "json") if name in exact else ""),
        ]
        for name, row in start["shapes"].items()
    ]
    depths = {r["hidden_vs_exact"]["depth"] for r in exact.values() if "hidden_vs_exact" in r}
    hidden_70b = f" (70B: {', '.join(map(str, sorted(depths)))} deep)" if depths else ""
    smol = start["smollm2"]
    smol_line = (
        "SmolLM2-135M's real scores, every site solved exactly: "
        + ", ".join(
            f"{kind} {row['sites']} site{'s' * (row['sites'] != 1)} {row['previous_s']:.1f} -> {row['current_s']:.1f} s"
            for kind, row in smol.items()
        )
        + f"; retained at least {min(row['retained_vs_previous_min'] for row in smol.values()):.6f} of before "
        + f"({link(START, 'json')})."
    )
    hungarian = ", ".join(f"{r['shape']} {r['seconds']:.2f} s ({r['blocks']} blocks)" for r in load(HARDENING)["rows"])
    steps = [
        [
            r["shape"],
            r["train_dtype"],
            r["checkpointing"],
            f"{r['step_seconds']:.1f}",
            f"{r['select_seconds']:.1f}",
            f"{r['peak_bytes'] / 1e9:.1f}",
            link(name, "json"),
        ]
        for name in E2E_SCALING
        for r in load(name)["rows"]
        if "error" not in r
    ]
    ranks = []
    for name in DISTRIBUTED:
        data = load(name)
        setup = data["setup"]
        for mode, e in data["summary"].items():
            run = f"{setup['steps']} x {setup['sequences_per_step']} x {setup['seq_len']}"
            ranks.append([run, mode, f"{e['step_seconds']:.2f}", str(e["same_permutations"]), link(name, "json")])
    return [
        "## Cost on 2 CPU cores",
        "",
        f"An end_to_end step (gather, 2 windows) {speed['float32']:.2f} s in float32, {speed['bfloat16']:.2f} s "
        f"under bfloat16 autocast; a selection {speed['select']:.2f} s ({link(LEARN_SPEED, 'json')}). The "
        f"Hungarian solves of every 64 x 64 block, one thread: {hungarian} ({link(HARDENING, 'json')}).",
        "",
        "Against layer width (one site, synthetic scores; seconds = a x C_in^b, projected to every decoder layer; "
        "70B extrapolated):",
        "",
        *table(["method", "exponent b", "LLaMA-2-7B (s)", "LLaMA-2-70B (s)", "file"], scaling),
        "",
        "The RIA-style start (`--init ria`, the default) on every site of a model, random Wanda-like scores of "
        "LLaMA-2 shapes (exact fold); retained score against the exact solver on one `mlp_out` and on a `hidden` "
        f"site two layers deep{hidden_70b}:",
        "",
        *table(
            [
                "shape",
                "all sites (s)",
                "measured",
                "mlp_out per site (s)",
                "hidden (s)",
                "retained / exact: mlp_out",
                "hidden",
                "file",
            ],
            starts,
        ),
        "",
        smol_line,
        "",
        "One end_to_end step (1 x 512 tokens) on random-weight Llama shapes:",
        "",
        *table(
            ["shape", "train dtype", "layer checkpointing", "step (s)", "selection (s)", "peak RSS (GB)", "file"], steps
        ),
        "",
        "Data-parallel learning (end_to_end, exact; gloo ranks on the same 2 cores):",
        "",
        *table(["steps x sequences x tokens", "configuration", "step (s)", "same permutations", "file"], ranks),
        "",
    ]


def image_section() -> list[str]:
    first = load(IMAGE_VIT[0])
    methods, model, images, settings = list(first["summary"]), first["model"], first["data"], first["settings"]
    body = []
    for name in IMAGE_VIT:
        data = load(name)
        cells = []
        for method in methods:
            e = data["summary"][method]
            cells.append(f"{e['top1']['median']:.1f} / {e['cross_entropy_recovered_percent']['median'] + 0.0:.0f}%")
        body.append([f"{data['dense']['top1']:.1f}", *cells, link(name, "json")])
    return [
        f"## Image classification: a small ViT trained by the benchmark, seeds {seed_range(first['seeds'])}",
        "",
        f"Protocol: `bench/image_vit.py`, a {model['num_hidden_layers']}-layer ViT trained on scikit-learn's digits, "
        f"{settings['scorer']} 2:4 from {settings['calibration']} calibration images, {images['test']} test images; "
        "each host trains its own model (one row each). Cells: top-1 / share of the 2:4 cross-entropy loss won back, "
        "medians over seeds.",
        "",
        *table(["dense top-1", *methods, "file"], body),
        "",
    ]


def report() -> tuple[str, dict]:
    headline: dict = {}
    body = [
        *sparsegpt_section(headline),
        *recipe_section(headline),
        *pipeline_section(headline),
        *objectives_section(),
        *anchors_section(headline),
        *zeroshot_section(),
        *architectures_section(),
        *export_section(),
        *cost_section(),
        *image_section(),
    ]
    cited = sorted(cited_files("\n".join(body)))
    stamped = sum(1 for n in cited if n.endswith(".json") and "provenance" in load(n))
    intro = [
        "# Results",
        "",
        "Written by `python bench/report.py` from the files in [bench/results/](../bench/results/README.md), whose "
        "index gives each file's command and the files not tabled here. Every figure is computed from the files; "
        "each row links its file; the `.md` beside a file, where there is one, has the per-seed rows. "
        f"{stamped} of the {len(cited)} files cited carry a `provenance` stamp; for the others the index gives the "
        "command and `git log` the commit.",
        "",
        "**Gap closed** ([defined once](method.md#gap-closed)): the share of the log-perplexity gap from the N:M "
        "pruner without permutation (0%) to the same pruner unstructured (100%), on the median across seeds. "
        "**Recovery**: the same share against the dense model.",
        "",
    ]
    return references("\n".join(intro + body).rstrip()) + "\n", headline


def references(markdown: str) -> str:
    """The page with each result file's link target written once: inline links to bench/results/ become
    numbered reference links (``[json][3]``), defined at the end in order of first use."""
    numbers: dict[str, int] = {}

    def number(match: re.Match) -> str:
        return f"][{numbers.setdefault(match.group(1), len(numbers) + 1)}]"

    text = re.sub(r"\]\((\.\./bench/results/[^)\s]+)\)", number, markdown)
    return "\n".join([text, "", *(f"[{n}]: {target}" for target, n in numbers.items())])


def cited_files(markdown: str) -> set[str]:
    """Result files a markdown page links (``](../bench/results/NAME)`` inline or ``[n]: ../bench/results/NAME``
    as a reference definition), relative to bench/results/."""
    return set(re.findall(r"\.\./bench/results/([^)\s#]+[^/)\s#])(?:\)|$)", markdown, re.M))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=OUTPUT)
    parser.add_argument("--check", action="store_true", help="compare with --output instead of writing it")
    args = parser.parse_args(argv)
    text, headline = report()
    if args.check:
        same = args.output.exists() and args.output.read_text() == text
        print(f"{args.output}: {'up to date' if same else 'differs from what the result files give'}")
        return 0 if same else 1
    args.output.write_text(text)
    figures = {k: v for k, v in headline.items() if isinstance(v, float)}
    print(f"wrote {args.output}; gap closed: " + ", ".join(f"{k} {v:.1%}" for k, v in figures.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
