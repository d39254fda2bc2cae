"""docs/results.md from the result files in bench/results/: every figure computed here, from the files.

    python bench/report.py                 # writes docs/results.md
    python bench/report.py --check         # exit 1 if docs/results.md is not what the files give

Each table names its protocol in one line and each row links the file it comes from; the gap
closed is bench/metrics.py's, stated once. The published anchors (SPEC section 8) are the only
figures typed here, in :data:`ANCHORS`, with their sources. No torch needed.
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
    GAP_CLOSED_DEFINITION,
    PENALTY_DEFINITION,
    gap_closed,
    gap_closed_of_medians,
    gap_closed_per_seed,
    penalty,
    penalty_fraction,
    recovery,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
OUTPUT = ROOT / "docs" / "results.md"

RECIPE_5SEEDS = "recipes-wanda-2of4-e2e-epochs-fp32-amd-5seeds.json"
RECIPE_FP32_SEED0 = "recipes-wanda-2of4-e2e-fp32-amd-seed0.json"
RECIPE_PIPELINE = "quality-wanda-2of4-e2e-exact-epochs-32x512-3seeds.json"
RECIPES_EARLIER = "recipes-smollm2-135m.json"
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


def stamp_of(name: str) -> str:
    """What the file records of where it ran: its provenance stamp, or the host fields older files have."""
    data = load(name) if name.endswith(".json") else {}
    stamp = data.get("provenance")
    if stamp:
        commit = (stamp["git"]["commit"] or "?")[:7] + (" +dirty" if stamp["git"]["dirty"] else "")
        dtype = stamp["train_dtype"]
        learning = "merged from stamped inputs" if dtype is None else f"learning in {dtype['resolved']}"
        return f"commit {commit}, {stamp['cpu']['model']}, {learning}, `{stamp['command']}`"
    return "written before result files were stamped: see bench/results/README.md for its command and commit"


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
        seed = int(run.get("seed", run["calibration"].rsplit("seed ", 1)[1].rstrip(")")))
        dense[seed] = run["dense_perplexity"]
        for variant in run["variants"]:
            by_variant.setdefault(variant["variant"], {})[seed] = variant
    return by_variant, dense


def median(values) -> float:
    return statistics.median(list(values))


# --- sections --------------------------------------------------------------------------------------------


def recipe_section(headline: dict) -> list[str]:
    rows, dense = recipe_rows(RECIPE_5SEEDS)
    seeds = sorted(dense)
    base, bound, learned = (ppl(rows[v]) for v in ("wanda", "wanda-unstructured", "wanda+learned"))
    gap = gap_closed_of_medians(base.values(), learned.values(), bound.values())
    first3 = [s for s in seeds if s < 3]
    gap3 = gap_closed_of_medians(*([p[s] for s in first3] for p in (base, learned, bound)))
    shares = gap_closed_per_seed(base, learned, bound)
    headline.update(recipe_5seeds=gap, recipe_seeds_0_2=gap3, recipe_per_seed=shares)
    out = [
        "## The llm-compressor recipe: Wanda 2:4 with the learned permutation",
        "",
        "Protocol: SmolLM2-135M (Q4_1 GGUF dequantised to float32) through `llmcompressor.oneshot` with "
        "`recipes/wanda-2of4-learned.yaml` at its defaults, 32 x 512 calibration tokens of "
        "`builtin:wiki-calibration` drawn by the seed (the same for the three variants of a seed), perplexity "
        "on the first 24 x 512 tokens of `builtin:wiki-evaluation`; `wanda-unstructured` is Wanda at 50% "
        f"without the 2:4 structure. Seeds {seeds[0]}-{seeds[-1]}, every row from {link(RECIPE_5SEEDS)}.",
        "",
    ]
    header = ["variant"] + [f"seed {s}" for s in seeds] + ["median", "gap closed", "file"]
    body = []
    for variant, values in (("wanda", base), ("wanda-unstructured", bound), ("wanda+learned", learned)):
        cells = [num(values.get(s)) for s in seeds]
        closed = f"**{pct(gap)}**" if variant == "wanda+learned" else ""
        body.append([variant, *cells, num(median(values.values())), closed, link(RECIPE_5SEEDS, "json")])
    body.append(
        ["gap closed per seed (extra)", *[pct(shares.get(s)) for s in seeds], "", "", link(RECIPE_5SEEDS, "json")]
    )
    out += table(header, body)
    learning = {s: rows["wanda+learned"][s].get("permutation_seconds") for s in seeds}
    learning = {s: t for s, t in learning.items() if t is not None}
    fp32 = load(RECIPE_FP32_SEED0)
    fp32_row = next(v for v in fp32["variants"] if v["variant"] == "wanda+learned")
    out += [
        "",
        f"Seeds 0-2 alone (the 3-seed protocol): {pct(gap3)} of the gap. Dense: "
        f"{num(median(dense.values()))}. Learning (the modifier's `permutation_seconds`, 2 CPU cores): "
        f"{min(learning.values()):.0f}-{max(learning.values()):.0f} s per seed; with `train_dtype: float32` "
        f"set, seed 0: {fp32_row['permutation_seconds']:.0f} s at perplexity {fp32_row['perplexity']:.2f} "
        f"({link(RECIPE_FP32_SEED0)}).",
        "",
    ]
    pipe = ppl(quality_rows(RECIPE_PIPELINE)["learned end_to_end (exact)"])
    pipe_seeds = sorted(pipe)
    base_p = {s: base[s] for s in pipe_seeds}
    bound_p = {s: bound[s] for s in pipe_seeds}
    pipe_gap = gap_closed_of_medians(base_p.values(), pipe.values(), bound_p.values())
    pipe_shares = gap_closed_per_seed(base_p, pipe, bound_p)
    headline["pipeline_seeds_0_2"] = pipe_gap
    out += [
        "**The pipeline path on the same protocol** (`permute_`, as `nmperm prune` runs it: "
        '`bench/quality.py --methods "learned end_to_end (exact)" --num-samples 32 --eval-samples 24`; the '
        "learned rows only, so the gap is taken against the recipe's Wanda rows of the same seeds above):",
        "",
    ]
    out += table(
        ["method"] + [f"seed {s}" for s in pipe_seeds] + ["median", "gap closed", "per seed (extra)", "file"],
        [
            [
                "learned end_to_end (exact), `permute_`",
                *[num(pipe[s]) for s in pipe_seeds],
                num(median(pipe.values())),
                pct(pipe_gap),
                ", ".join(pct(g) for g in pipe_shares.values()),
                link(RECIPE_PIPELINE, "json"),
            ]
        ],
    )
    return out + [""]


def earlier_recipes_section(headline: dict) -> list[str]:
    data = load(RECIPES_EARLIER)
    dense = data["dense_perplexity"]
    rows = {v["variant"]: v for v in data["variants"]}
    out = [
        "## Stock recipes with SparseGPT, one seed (the recipes before end_to_end)",
        "",
        f"Protocol: `bench/recipes.py --num-samples 16 --eval-samples 16`: {data['calibration']}, evaluation "
        f"{data['evaluation']}, seed 0; the permutation modifier ran the `layerwise` objective (2 epochs, exact), "
        f"the default of the recipes then. Dense {dense:.2f}. SparseGPT here updates the weights it keeps.",
        "",
    ]
    body = []
    for name, row in rows.items():
        reference = rows.get(name.partition("+")[0]) if "+" in name else None
        fraction = penalty_fraction(row["perplexity"], reference["perplexity"], dense) if reference else None
        learning = row.get("permutation_seconds")
        body.append(
            [
                name,
                num(row["perplexity"]),
                num(penalty(row["perplexity"], dense), ".3f"),
                pct(fraction),
                num(row["oneshot_seconds"], ".0f"),
                "" if learning is None else f"{learning:.0f}",
                f"{row['linears_2of4']}/{row['linears']}",
                link(RECIPES_EARLIER, "json"),
            ]
        )
    out += table(
        [
            "variant",
            "perplexity",
            "penalty",
            "penalty / same pruner's",
            "oneshot (s)",
            "learning (s)",
            "2:4 linears",
            "file",
        ],
        body,
    )
    if "sparsegpt+learned" in rows:
        headline["sparsegpt_penalty_fraction"] = penalty_fraction(
            rows["sparsegpt+learned"]["perplexity"], rows["sparsegpt"]["perplexity"], dense
        )
    return out + [""]


def quality_table(name: str, methods: list[str] | None = None, dense: float | None = None) -> tuple[list[str], dict]:
    """The bench/quality.py table of ``name``: per method the median (min-max), the gap closed (on the
    medians), the per-seed shares, retained share, learning seconds and peak RSS; and the medians."""
    by_method = quality_rows(name)
    base, bound = ppl(by_method.get(BASE, {})), ppl(by_method.get(UNSTRUCTURED, {}))
    if dense is None and DENSE in by_method:
        dense = median(ppl(by_method[DENSE]).values())
    body, medians = [], {}
    for method in methods or list(by_method):
        if method not in by_method:
            continue
        values = ppl(by_method[method])
        medians[method] = median(values.values())
        closed = shares = rec = ""
        if base and bound and method != DENSE:
            closed = pct(gap_closed_of_medians(base.values(), values.values(), bound.values()))
            per_seed = gap_closed_per_seed(base, values, bound)
            shares = (
                ", ".join(pct(g) for g in per_seed.values())
                if len(values) > 1 and method not in (BASE, UNSTRUCTURED)
                else ""
            )
        if base and dense and method != DENSE:
            rec = pct(recovery(median(base.values()), medians[method], dense))
        rows = by_method[method].values()
        retained = [r["retained_ratio"] for r in rows if r.get("retained_ratio") is not None]
        seconds = [r["seconds"] for r in rows if r.get("seconds") is not None]
        rss = [r["peak_rss_mb"] for r in rows if r.get("peak_rss_mb") is not None]
        spread = f" ({min(values.values()):.2f}-{max(values.values()):.2f})" if len(values) > 1 else ""
        body.append(
            [
                method,
                ",".join(map(str, sorted(values))),
                f"{medians[method]:.2f}{spread}",
                closed,
                shares,
                rec,
                num(median(retained), ".4f") if retained and "unstructured" not in method else "",
                num(median(seconds), ".0f") if seconds else "",
                num(median(rss), ".0f") if rss else "",
                link(name, "json"),
            ]
        )
    header = [
        "method",
        "seeds",
        "perplexity median (min-max)",
        "gap closed",
        "per seed (extra)",
        "recovery",
        "retained",
        "learning (s)",
        "peak RSS (MB)",
        "file",
    ]
    return table(header, body), medians


def quality_protocol(name: str) -> str:
    args = load(name)["args"]
    overrides = f"; `--set {' '.join(args['set'])}`" if args.get("set") else ""
    return (
        f"Protocol: SmolLM2-135M, {args['scorer']} {args['pattern']}, `bench/quality.py` (each method and seed "
        f"in its own process), calibration {args['num_samples']} x {args['seq_len']} tokens drawn by the seed, "
        f"evaluation the first {args['eval_samples']} x {args['seq_len']} tokens of `builtin:wiki-evaluation`"
        f"{overrides}. Source: {link(name)} ({stamp_of(name)})."
    )


def quality_section(headline: dict) -> list[str]:
    dense = median(ppl(quality_rows(Q_ALL)[DENSE]).values())
    out = ["## The pipeline (`permute_`, `nmperm prune`) on the 16 x 512 protocol", ""]
    out += [
        f"The 16 x 512 protocol's dense perplexity is {dense:.2f} ({link(Q_ALL)}); recovery is taken against it.",
        "",
    ]
    lines, medians = quality_table(Q_DEFAULT, dense=dense)
    rows = quality_rows(Q_DEFAULT)
    base, bound = ppl(rows[BASE]), ppl(rows[UNSTRUCTURED])
    for method, key in (
        ("learned end_to_end (exact)", "quality_exact"),
        ("learned end_to_end (gather)", "quality_gather"),
    ):
        headline[key] = gap_closed_of_medians(base.values(), ppl(rows[method]).values(), bound.values())
    out += [
        "### Wanda 2:4, end_to_end at its defaults (120 steps in gather, 80 in exact), 3 seeds",
        "",
        quality_protocol(Q_DEFAULT),
        "",
        *lines,
        "",
        "### Wanda 2:4, gather, 5 seeds",
        "",
        quality_protocol(Q_GATHER_5),
        "",
        *quality_table(Q_GATHER_5, dense=dense)[0],
        "",
        "### Every method, Wanda 2:4, 3 seeds (end_to_end and staged at 20 steps, the default then)",
        "",
        quality_protocol(Q_ALL),
        "",
        *quality_table(Q_ALL)[0],
        "",
        "### SparseGPT's saliency (no weight update), exact fold, 3 seeds (end_to_end at 20 steps)",
        "",
        quality_protocol(Q_SPARSEGPT),
        "",
        *quality_table(Q_SPARSEGPT, dense=dense)[0],
        "",
        "### Wanda 4:8, seed 0 (end_to_end at 20 steps; the rows keep the suite's names)",
        "",
        quality_protocol(Q_4OF8),
        "",
        *quality_table(Q_4OF8, dense=dense)[0],
        "",
    ]
    headline["anchor_medians"] = medians | {DENSE: dense}
    return out + window_curve_lines()


def window_curve_lines() -> list[str]:
    data = load(WINDOW_CURVE)
    base = data["baselines"][BASE]["perplexity"]
    bound = data["baselines"][UNSTRUCTURED]["perplexity"]
    protocol = data["baselines"]["protocol"]
    out = [
        "### The window objective against its window size K, seed 0",
        "",
        f"Protocol: as above ({protocol['scorer']} {protocol['pattern']}, calibration {protocol['num_samples']} x "
        f"{protocol['seq_len']}, evaluation {protocol['eval_samples']} x {protocol['seq_len']}), exact fold, "
        f"`--set window_layers=K`; K = 30 is end_to_end. 2:4 without permutation {base:.2f}, unstructured "
        f"{bound:.2f}, same seed. Source: {link(WINDOW_CURVE)} ({stamp_of(WINDOW_CURVE)}).",
        "",
    ]
    body = [
        [
            str(p["window"]),
            num(p["perplexity"]),
            pct(gap_closed(base, p["perplexity"], bound)),
            num(p["seconds"], ".0f"),
            num(p["peak_rss_mb"] / 1000, ".1f"),
            link(WINDOW_CURVE, "json"),
        ]
        for p in data["points"]
    ]
    return out + table(["K", "perplexity", "gap closed", "learning (s)", "peak RSS (GB)", "file"], body) + [""]


def anchors_section(headline: dict) -> list[str]:
    out = [
        "## Published anchors (SPEC section 8)",
        "",
        "WikiText-2 perplexities from the papers (typed in `bench/report.py`, `ANCHORS`); recovery = "
        "(ln ppl_2:4 - ln ppl_method) / (ln ppl_2:4 - ln ppl_dense), computed here. Compare within a row only: "
        "models, context lengths and calibration differ.",
        "",
    ]
    body = []
    for source, model, dense, wanda, (heuristic, name), learned in ANCHORS:
        rh, rl = recovery(wanda, heuristic, dense), recovery(wanda, learned, dense)
        body.append(
            [
                source,
                model,
                f"{dense:.2f}",
                f"{wanda:.2f}",
                f"{heuristic:.2f}, {name} ({pct(rh)})",
                f"{learned:.2f} ({pct(rl)})",
                f"{rl / rh:.1f}x",
            ]
        )
    out += table(
        ["source", "model", "dense", "Wanda 2:4", "heuristic (recovery)", "learned (recovery)", "learned / heuristic"],
        body,
    )
    m = headline["anchor_medians"]
    dense, wanda = m[DENSE], m[BASE]
    ours = []
    for fold in ("gather", "exact"):
        heuristic, learned = m[f"RIA-style ({fold})"], m[f"learned end_to_end ({fold})"]
        rh, rl = recovery(wanda, heuristic, dense), recovery(wanda, learned, dense)
        ours.append(
            [
                f"this project, {fold} ({link(Q_DEFAULT, 'json')}, dense from {link(Q_ALL, 'json')})",
                "SmolLM2-135M (Q4_1)",
                f"{dense:.2f}",
                f"{wanda:.2f}",
                f"{heuristic:.2f}, RIA-style ({pct(rh)})",
                f"{learned:.2f}, end_to_end ({pct(rl)})",
                f"{rl / rh:.1f}x",
            ]
        )
    out += ["", "Beside them, this project's medians on the 16 x 512 protocol (Wikipedia text, not WikiText-2):", ""]
    out += table(
        ["source", "model", "dense", "Wanda 2:4", "heuristic (recovery)", "learned (recovery)", "learned / heuristic"],
        ours,
    )
    return out + [""]


def zeroshot_section() -> list[str]:
    out = [
        "## Zero-shot accuracy (lm-eval, first 100 documents per task), seed 0",
        "",
        "Protocol: `bench/zeroshot.py --limit 100`: eight tasks with lm-eval 0.4.13's prompts on local data; "
        '"signal" tasks are those where dense beats guessing by more than two standard errors; recovered = '
        "(mean_row - mean_2:4) / (mean_dense - mean_2:4) on them.",
        "",
    ]
    body = []
    for name in ZEROSHOT:
        data = load(name)
        scorer = name.split("-")[1]
        for method, e in data["summary"].items():
            signal = e["signal"]
            body.append(
                [
                    f"{scorer}: {method}",
                    f"{e['all']['mean_acc']:.4f} ± {e['all']['mean_acc_stderr']:.4f}",
                    "" if signal.get("mean_acc") is None else f"{signal['mean_acc']:.4f}",
                    ", ".join(signal.get("tasks", [])),
                    pct(signal.get("recovered"), 0),
                    num(e["perplexity"], ".1f"),
                    link(name, "json"),
                ]
            )
    return (
        out
        + table(["row", "mean acc (8 tasks)", "signal mean", "signal tasks", "recovered", "perplexity", "file"], body)
        + [""]
    )


def architectures_section() -> list[str]:
    out = [
        "## Architectures (tiny random configs: fold exactness and 2:4, no quality)",
        "",
        "Protocol: `bench/architectures.py`: every supported family on a tiny random config, float32, 1 thread; "
        "fold error = largest logit difference relative to the logits' scale after folding random permutations; "
        "2:4 linears and `nmperm verify` over the learned and RIA runs in both folds.",
        "",
    ]
    body = []
    for name in ARCHITECTURES:
        for row in load(name)["rows"]:
            errors, runs = row["fold_error"], row["runs"].values()
            gather = "refused" if errors["gather"] is None else f"{errors['gather']:.1e}"
            passed = sum(r["verify"] == "passed" for r in runs)
            body.append(
                [
                    row["family"],
                    f"{errors['exact']:.1e}",
                    gather,
                    f"{sum(r['nm_linears'] for r in runs)}/{sum(r['linears'] for r in runs)}",
                    f"{passed}/{len(row['runs'])}",
                    link(name, "json"),
                ]
            )
    return (
        out
        + table(["family", "fold error exact", "fold error gather", "2:4 linears", "verify passed", "file"], body)
        + [""]
    )


def export_section() -> list[str]:
    text = (RESULTS / EXPORT).read_text()
    found = re.search(r"(\d+) converted, (\d+) ready, (\d+) left dense", text)
    converted, ready, left = (int(g) for g in found.groups()) if found else (None, None, None)
    exact = sum(1 for line in text.splitlines() if re.search(r"\bready\s+exact\b", line))
    out = [
        "## Export and serving",
        "",
        "Protocol: `nmperm demo`, then `nmperm export nmperm-demo-output --to torchao --dtype bf16 --check` on a "
        f"CPU machine: {ready} linears ready for cuSPARSELt bf16 ({exact} with an exact round trip), {converted} "
        f"converted (no GPU), {left} left dense ({link(EXPORT)}).",
        "",
    ]
    check = load(GPU_CHECK)["model_check"]
    env = (RESULTS / GPU_ENV).read_text()
    versions = re.search(r"^gpu (.+)$", env, re.M), re.search(r"^torch (\S+)", env, re.M)
    versions += (re.search(r"torchao (\S+)", env), re.search(r"transformers (\S+)", env))
    gpu, torch_v, torchao_v, transformers_v = (m.group(1) if m else "?" for m in versions)
    passed = re.search(r"(\d+) passed", (RESULTS / GPU_TESTS).read_text())
    out += [
        f"The GPU rows ran on {gpu} with torch {torch_v}, torchao {torchao_v}, transformers {transformers_v} "
        f"({link(GPU_ENV)}), where `tests/test_export.py` with its GPU tests passed "
        f"{passed.group(1) if passed else '?'} tests ({link(GPU_TESTS)}).",
        "",
    ]
    out += [
        f"On a lent H200: a SmolLM2-shaped 2:4 model converted to cuSPARSELt bf16 "
        f"({check['export']['counts']['converted']} linears) gives the same greedy tokens as the dense one: "
        f"{check['same_tokens']} ({link(GPU_CHECK)}). Per linear, eager and compiled:",
        "",
    ]
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
                body.append(
                    [
                        label,
                        str(len(values)),
                        f"{median(values):.2f}x",
                        f"{min(values):.2f}-{max(values):.2f}x",
                        link(name, "json"),
                    ]
                )
    return (
        out + table(["speed-up (dense time / sparse time)", "shapes x tokens", "median", "range", "file"], body) + [""]
    )


def cost_section() -> list[str]:
    speed = load(LEARN_SPEED)["end_to_end"]
    out = [
        "## Cost on 2 CPU cores",
        "",
        f"Learner pieces ({link(LEARN_SPEED)}, medians of 5): an end_to_end step (gather, 2 windows) "
        f"{speed['float32']:.2f} s in float32, {speed['bfloat16']:.2f} s under bfloat16 autocast "
        f"({speed['ratio_float32_over_bfloat16']:.2f}x); a selection {speed['select']:.2f} s.",
        "",
    ]
    fits = load(SCALING)
    body = [
        [
            method,
            f"{fit['b']:.2f}",
            f"{fits['projection']['llama-2-7b'][method]['seconds']:.0f}",
            f"{fits['projection']['llama-2-70b'][method]['seconds']:.0f}",
            link(SCALING, "json"),
        ]
        for method, fit in fits["fits"].items()
    ]
    out += [
        "Against layer width (one site, 2048 rows, synthetic Wanda-like scores; seconds = a x C_in^b, projected to "
        "every decoder layer's sites, 70B extrapolated beyond the widest measured):",
        "",
        *table(["method", "exponent b", "LLaMA-2-7B (s)", "LLaMA-2-70B (s)", "file"], body),
        "",
        "The Hungarian solves of every 64 x 64 block (one thread, medians of 5):",
        "",
    ]
    out += table(
        ["shape", "blocks", "seconds", "file"],
        [
            [r["shape"], str(r["blocks"]), f"{r['seconds']:.3f}", link(HARDENING, "json")]
            for r in load(HARDENING)["rows"]
        ],
    )
    out += ["", "One end_to_end step (1 x 512 tokens) on random-weight Llama shapes:", ""]
    body = []
    for name in E2E_SCALING:
        for r in load(name)["rows"]:
            if "error" in r:
                continue
            body.append(
                [
                    r["shape"],
                    r["train_dtype"],
                    r["checkpointing"],
                    f"{r['step_seconds']:.1f}",
                    f"{r['select_seconds']:.1f}",
                    f"{r['peak_bytes'] / 1e9:.1f}",
                    link(name, "json"),
                ]
            )
    out += table(
        ["shape", "train dtype", "layer checkpointing", "step (s)", "selection (s)", "peak RSS (GB)", "file"], body
    )
    out += ["", "Data-parallel learning (end_to_end, exact; gloo ranks on the same 2 cores):", ""]
    body = []
    for name in DISTRIBUTED:
        data = load(name)
        setup = data["setup"]
        for mode, e in data["summary"].items():
            body.append(
                [
                    f"{setup['steps']} steps of {setup['sequences_per_step']} x {setup['seq_len']}",
                    mode,
                    f"{e['step_seconds']:.2f}",
                    str(e["same_permutations"]),
                    link(name, "json"),
                ]
            )
    out += table(["run", "configuration", "step (s)", "same permutations", "file"], body)
    return out + [""]


def image_section() -> list[str]:
    out = [
        "## Image classification: a small ViT trained by the benchmark, 3 seeds",
        "",
        "Protocol: `bench/image_vit.py`: a 4-layer ViT (hidden 128) trained on scikit-learn's digits at 32x32, "
        "Wanda 2:4 of every linear from 128 labelled calibration images per seed, 450 test images. The training "
        "differs between hosts, so each file is its own model; recovered = share of the 2:4 loss won back, "
        "median (min to max) over seeds.",
        "",
    ]
    body = []
    for name in IMAGE_VIT:
        data = load(name)
        for method, e in data["summary"].items():
            ce = {k: v + 0.0 for k, v in e["cross_entropy_recovered_percent"].items()}  # no "-0.0"
            body.append(
                [
                    method,
                    f"{data['dense']['top1']:.2f}",
                    f"{e['top1']['median']:.2f} ({e['top1']['min']:.2f}-{e['top1']['max']:.2f})",
                    f"{e['cross_entropy']['median']:.4f}",
                    f"{ce['median']:.1f}% ({ce['min']:.1f} to {ce['max']:.1f})",
                    link(name, "json"),
                ]
            )
    return (
        out
        + table(
            ["method", "dense top-1", "top-1 median (range)", "test cross-entropy", "recovered cross-entropy", "file"],
            body,
        )
        + [""]
    )


def report() -> tuple[str, dict]:
    headline: dict = {}
    sections = [
        "# Results",
        "",
        "Written by `python bench/report.py` from the files in [bench/results/](../bench/results/) (their index, "
        "with the command that wrote each: [bench/results/README.md](../bench/results/README.md)); every figure "
        "is computed from the files. Each row links its file, whose `provenance` block (files written since "
        "stamping began) records the command, commit, CPU, train dtype, versions, seeds and wall time.",
        "",
        f"**Gap closed**, in every table: {GAP_CLOSED_DEFINITION}. Per-seed shares (each seed against its own "
        "baselines) are listed as extra information, never as the headline. **Recovery**: the same share "
        f"against the dense model. **Penalty**: {PENALTY_DEFINITION}.",
        "",
    ]
    sections += recipe_section(headline)
    sections += earlier_recipes_section(headline)
    sections += quality_section(headline)
    sections += anchors_section(headline)
    sections += zeroshot_section()
    sections += architectures_section()
    sections += export_section()
    sections += cost_section()
    sections += image_section()
    return "\n".join(sections).rstrip() + "\n", headline


def cited_files(markdown: str) -> set[str]:
    """Result files a markdown page links (``../bench/results/NAME``), relative to bench/results/."""
    return set(re.findall(r"\.\./bench/results/([^)\s#]+[^/)\s#])\)", markdown))


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
