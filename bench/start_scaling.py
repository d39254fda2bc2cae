"""The heuristic start (RIA-style assignment) at SmolLM2-135M, LLaMA-2-7B and 70B site shapes: the
solver of an earlier commit (``--previous``, exact: every row, one assignment over all groups per
slot) against the current one (row sample and blocks above ``EXACT_WORK``, ``core/solvers.py``).

Sites of the exact fold (``hidden``: q, k, v, gate and up of every layer stacked; ``mlp_out``: down's
input; ``attn_out``: o's input, one permutation per KV head group):

* SmolLM2-135M: its real Wanda scores (32 x 512 tokens of ``builtin:wiki-calibration``), every site,
  both solvers, through ``learn.run.solve_site`` as a run calls it;
* 7B / 70B shapes: random Wanda-like scores (heavy-tailed channel norms shared by a layer's
  linears, log-normal row scales, each linear normalised to mean 1 as a run does). The current
  solver's time for every site of the model (70B: ``--layers-70b`` layers timed, the rest counted
  at their median, since every layer's sites have the same shape); the retained score against the
  exact solver (run with ``EXACT_WORK`` unbounded, the same algorithm as ``--previous`` with the
  current gain kernel) on one ``mlp_out`` and on a ``hidden`` site ``--hidden-depth`` layers deep,
  where the exact solver still finishes in minutes. The full ``hidden`` site is never built: its
  parts are generated one at a time and sampled (``solvers.sample_rows``), as ``stack_rows`` does.

    python bench/start_scaling.py --output bench/results/start-scaling-cpu2
    python bench/start_scaling.py --exact-only llama-2-70b --exact-hidden-depth 1 \
        --output bench/results/start-exact-70b-cpu2
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from result_files import write_pair

ROOT = Path(__file__).resolve().parents[1]
# name: (hidden, intermediate, layers, heads, kv heads)
SHAPES = {"llama-2-7b": (4096, 11008, 32, 32, 32), "llama-2-70b": (8192, 28672, 80, 64, 8)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--previous", default="7030ae3", help="commit whose solvers.py is the previous solver")
    parser.add_argument("--layers-70b", type=int, default=4, help="70B layers whose sites are timed")
    parser.add_argument("--hidden-depth", type=int, default=2, help="layers of the hidden site solved exactly")
    parser.add_argument("--hidden-depth-70b", type=int, default=8, help="layers of the 70B hidden site timed")
    parser.add_argument("--skip-smollm2", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--exact-only",
        choices=sorted(SHAPES),
        help="only one mlp_out of this shape against the exact solver (70B: about 45 minutes on 2 cores)",
    )
    parser.add_argument(
        "--exact-hidden-depth", type=int, default=0, help="with --exact-only: and a hidden site this many layers deep"
    )
    return parser.parse_args(argv)


def previous_solvers(commit: str):
    """``core/solvers.py`` at ``commit`` as a module."""
    source = subprocess.run(
        ["git", "show", f"{commit}:nmperm_plugin/core/solvers.py"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.replace("from .nm import", "from nmperm_plugin.core.nm import")
    path = Path("/tmp") / f"nmperm_solvers_{commit}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"solvers_{commit}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def retained(parts, perm: torch.Tensor, pattern) -> float:
    """Sum over rows and groups of the N largest scores per group in ``perm``'s order."""
    total = 0.0
    for part in parts:
        part = part() if callable(part) else part
        grouped = part[:, perm].reshape(part.shape[0], -1, pattern.m)
        total += float(grouped.topk(pattern.n, dim=-1).values.sum(dtype=torch.float64))
    return total


def timed(fn, *args):
    start = time.perf_counter()
    value = fn(*args)
    return value, time.perf_counter() - start


# -- SmolLM2-135M: real scores ----------------------------------------------------------------------------


def smollm2(previous, seed: int = 0) -> dict:
    from nmperm_plugin.config import PermuteConfig
    from nmperm_plugin.core import solvers
    from nmperm_plugin.data.text import load_texts, token_windows
    from nmperm_plugin.io.models import default_model_path, load_model
    from nmperm_plugin.learn.pipeline import make_run
    from nmperm_plugin.learn.run import solve_site

    model, tokenizer = load_model(default_model_path())
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    calibration = token_windows(tokenizer, load_texts("builtin:wiki-calibration"), 32, 512, seed=seed)
    run = make_run(model, calibration, PermuteConfig(method="ria", fold="exact", seed=seed))
    with run.adapter.linear_form(model):
        hidden, kwargs = run.layer_inputs()
        scores, _ = run.dense_pass(hidden, kwargs, list(run.linears), keep_outputs=False)
    kinds: dict[str, dict] = {}
    for site in run.sites:
        row = kinds.setdefault(site.kind, {"sites": 0, "previous_s": 0.0, "current_s": 0.0, "ratios": []})
        parts = [scores[n] for n in site.linears]
        old, t_old = timed(solve_site, site, scores, previous.assignment, run.pattern, torch.Generator())
        new, t_new = timed(solve_site, site, scores, solvers.assignment, run.pattern, torch.Generator())
        row["sites"] += 1
        row["previous_s"] += t_old
        row["current_s"] += t_new
        row["ratios"].append(retained(parts, new, run.pattern) / retained(parts, old, run.pattern))
    for row in kinds.values():
        ratios = row.pop("ratios")
        row |= {"retained_vs_previous_min": min(ratios), "retained_vs_previous_mean": statistics.fmean(ratios)}
    return kinds


# -- 7B / 70B shapes: random scores ------------------------------------------------------------------------


def channel_norms(channels: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.empty(channels).exponential_(generator=generator) ** 2


def linear_scores(rows: int, norms: torch.Tensor, seed: int) -> torch.Tensor:
    """Wanda-like scores ``|W| * ||X_j||`` of a ``rows x len(norms)`` linear, normalised to mean 1."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, len(norms), generator=generator).abs_()
    weight *= torch.empty(rows, 1).log_normal_(0, 0.3, generator=generator)
    weight *= norms
    return weight.div_(weight.mean())


def hidden_parts(shape, depth: int, seed: int) -> list:
    """The hidden site's linears of ``depth`` layers, as functions that generate their scores."""
    hidden, intermediate, _, heads, kv = shape
    head_dim = hidden // heads
    base = channel_norms(hidden, seed)  # the residual stream's outlier channels persist across layers
    parts = []
    for layer in range(depth):
        generator = torch.Generator().manual_seed(seed + 1000 + layer)
        norms = base * torch.empty(hidden).log_normal_(0, 0.5, generator=generator)
        for k, rows in enumerate((heads * head_dim, kv * head_dim, kv * head_dim, intermediate, intermediate)):
            parts.append((rows, lambda rows=rows, norms=norms, s=seed + 10 * layer + k: linear_scores(rows, norms, s)))
    return parts


def solve_hidden(parts, channels: int, pattern, solver, generator) -> torch.Tensor:
    """``stack_rows`` + ``solver``, one generated part at a time (a 7B model's whole site is 18 GB)."""
    from nmperm_plugin.core import solvers

    total = sum(rows for rows, _ in parts)
    kept, _ = solvers.solve_shape(total, channels, pattern)
    if kept >= total:
        return solver(torch.cat([make() for _, make in parts]), pattern, generator)
    sample = [solvers.sample_rows(make(), max(1, kept * rows // total), generator) for rows, make in parts]
    return solver(torch.cat(sample), pattern, generator)


def exact(scores, pattern):
    from nmperm_plugin.core import solvers

    saved = solvers.EXACT_WORK
    solvers.EXACT_WORK = 2**62
    try:
        return solvers.assignment(scores, pattern)
    finally:
        solvers.EXACT_WORK = saved


def versus_exact(label: str, scores: torch.Tensor, current, pattern) -> dict:
    """Time the exact solver on ``scores`` and ``current()`` (the current solver's permutation), and
    the retained score of that and of the allocation alone over the exact solver's."""
    from nmperm_plugin.core import solvers

    reference, exact_s = timed(lambda: exact(scores, pattern))
    print(f"{label}: exact solver {exact_s:.0f}s", flush=True)
    permutation, current_s = timed(current)
    base = retained([scores], reference, pattern)
    row = {
        "exact_s": exact_s,
        "current_s": current_s,
        "retained_current_over_exact": retained([scores], permutation, pattern) / base,
        "retained_allocation_over_exact": retained([scores], solvers.allocation(scores, pattern), pattern) / base,
    }
    print(f"{label} vs exact: {row}", flush=True)
    return row


def mlp_out_vs_exact(name: str, shape, seed: int = 0) -> dict:
    """:func:`versus_exact` on one ``mlp_out`` site of ``shape`` (the scores model_shape's first layer times)."""
    from nmperm_plugin.core import solvers
    from nmperm_plugin.core.nm import NMPattern

    pattern = NMPattern(2, 4)
    scores = linear_scores(shape[0], channel_norms(shape[1], seed), seed + 100)
    rng = torch.Generator().manual_seed(seed)
    return versus_exact(f"{name} mlp_out", scores, lambda: solvers.assignment(scores, pattern, rng), pattern)


def hidden_vs_exact(name: str, shape, depth: int, seed: int = 0) -> dict:
    """The same on a ``hidden`` site ``depth`` layers deep, built whole for the exact solver; the
    current solver samples it part by part as a run does."""
    from nmperm_plugin.core import solvers
    from nmperm_plugin.core.nm import NMPattern

    pattern, hidden = NMPattern(2, 4), shape[0]
    parts = hidden_parts(shape, depth, seed)
    whole = torch.cat([make() for _, make in parts])
    rng = torch.Generator().manual_seed(seed)
    kept = solvers.solve_shape(whole.shape[0], hidden, pattern)[0]
    return {"depth": depth, "rows": whole.shape[0], "rows_kept": kept} | versus_exact(
        f"{name} hidden ({depth} layers)",
        whole,
        lambda: solve_hidden(parts, hidden, pattern, solvers.assignment, rng),
        pattern,
    )


def model_shape(name: str, shape, timed_layers: int, hidden_depth: int, exact_depth: int, seed: int = 0) -> dict:
    from nmperm_plugin.core import solvers
    from nmperm_plugin.core.nm import NMPattern
    from nmperm_plugin.core.ops import tied_head_perm

    pattern = NMPattern(2, 4)
    hidden, intermediate, layers, heads, kv = shape
    head_dim, group = hidden // heads, heads // kv
    out: dict = {"shape": dict(zip(("hidden", "intermediate", "layers", "heads", "kv_heads"), shape, strict=True))}
    rng = torch.Generator().manual_seed(seed)

    # every layer's mlp_out and attn_out (timed_layers of them), the hidden site
    mlp_times, attn_times = [], []
    for layer in range(timed_layers):
        scores = linear_scores(hidden, channel_norms(intermediate, seed + layer), seed + 100 + layer)
        _, seconds = timed(solvers.assignment, scores, pattern, rng)
        mlp_times.append(seconds)
        o_proj = linear_scores(hidden, channel_norms(hidden, seed + 200 + layer), seed + 300 + layer)

        def attn(o_proj=o_proj):
            per_group = []
            for g in range(kv):
                columns = [o_proj[:, h * head_dim : (h + 1) * head_dim] for h in range(g * group, (g + 1) * group)]
                per_group.append(solvers.assignment(torch.cat(columns), pattern, rng))
            return tied_head_perm([h // group for h in range(heads)], torch.stack(per_group))

        _, seconds = timed(attn)
        attn_times.append(seconds)
        print(f"{name} layer {layer}: mlp_out {mlp_times[-1]:.1f}s attn_out {attn_times[-1]:.2f}s", flush=True)
    parts = hidden_parts(shape, hidden_depth, seed)
    started = time.perf_counter()
    total_rows = sum(rows for rows, _ in parts)
    kept, block = solvers.solve_shape(total_rows, hidden, pattern)
    sample = [solvers.sample_rows(make(), max(1, kept * rows // total_rows), rng) for rows, make in parts]
    generated = sum(1 for _ in parts)
    sampled = torch.cat(sample)
    sampling_s = time.perf_counter() - started  # includes generating the scores, which a run already has
    _, hidden_s = timed(solvers.assignment, sampled, pattern, rng)
    del sample, sampled
    untimed = (layers - timed_layers) * (statistics.median(mlp_times) + statistics.median(attn_times))
    out["time"] = {
        "mlp_out_s_per_site": mlp_times,
        "attn_out_s_per_site": attn_times,
        "hidden_s": hidden_s,
        "hidden_sampling_with_generation_s": sampling_s,
        "hidden_depth": hidden_depth,
        "hidden_rows": total_rows * layers // hidden_depth,
        "hidden_rows_kept": kept,
        "hidden_block_groups": block,
        "timed_layers": timed_layers,
        "all_sites_s": sum(mlp_times) + sum(attn_times) + hidden_s + untimed,
        "all_sites_measured": timed_layers == layers and hidden_depth == layers,
        "generated_parts": generated,
    }
    print(f"{name}: all sites {out['time']['all_sites_s']:.0f}s (hidden {hidden_s:.1f}s)", flush=True)

    if exact_depth:  # retained against the exact solver: one mlp_out, and a hidden site exact_depth layers deep
        out["mlp_out_vs_exact"] = mlp_out_vs_exact(name, shape, seed)
        out["hidden_vs_exact"] = hidden_vs_exact(name, shape, exact_depth, seed)
    return out


def markdown(result: dict) -> str:
    lines: list[str] = []
    if "smollm2" in result:
        lines += ["## SmolLM2-135M (real Wanda scores, every site)", ""]
        lines += [
            "| site | sites | previous (s) | current (s) | retained current / previous: min | mean |",
            "|---|---|---|---|---|---|",
        ]
        for kind, row in result["smollm2"].items():
            lines.append(
                f"| {kind} | {row['sites']} | {row['previous_s']:.1f} | {row['current_s']:.1f} | "
                f"{row['retained_vs_previous_min']:.6f} | {row['retained_vs_previous_mean']:.6f} |"
            )
        lines.append("")
    lines += ["## 7B / 70B shapes (random Wanda-like scores)"]
    timed_shapes = {name: row["time"] for name, row in result["shapes"].items() if "time" in row}
    if timed_shapes:
        lines += [
            "",
            "| shape | all sites (s) | of which measured | mlp_out median (s) | attn_out median (s) | hidden (s) "
            "| hidden rows kept |",
            "|---|---|---|---|---|---|---|",
        ]
    for name, t in timed_shapes.items():
        measured = "all" if t["all_sites_measured"] else f"{t['timed_layers']} layers, hidden {t['hidden_depth']} deep"
        lines.append(
            f"| {name} | {t['all_sites_s']:.0f} | {measured} | {statistics.median(t['mlp_out_s_per_site']):.2f} | "
            f"{statistics.median(t['attn_out_s_per_site']):.2f} | {t['hidden_s']:.1f} | "
            f"{t['hidden_rows_kept']} of {t['hidden_rows']} |"
        )
    lines += [
        "",
        "| shape | site | exact (s) | current (s) | retained current / exact | allocation / exact |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in result["shapes"].items():
        for site in ("mlp_out_vs_exact", "hidden_vs_exact"):
            if site in row:
                r = row[site]
                label = site.split("_vs")[0] + (f" ({r['depth']} layers, {r['rows']} rows)" if "depth" in r else "")
                lines.append(
                    f"| {name} | {label} | {r['exact_s']:.1f} | {r['current_s']:.1f} | "
                    f"{r['retained_current_over_exact']:.6f} | {r['retained_allocation_over_exact']:.6f} |"
                )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
    torch.set_num_threads(args.threads)
    result: dict = {"exact_work": None, "shapes": {}}
    from nmperm_plugin.core import solvers

    result |= {"exact_work": solvers.EXACT_WORK, "block_groups": solvers.BLOCK_GROUPS, "previous": args.previous}
    if args.exact_only:  # each comparison written as it ends: the next may outlast the caller's limit
        name, shape = args.exact_only, SHAPES[args.exact_only]
        row = result["shapes"][name] = {"mlp_out_vs_exact": mlp_out_vs_exact(name, shape)}
        json_path, _ = write_pair(args.output, result, markdown(result), seeds=[0], started=started, train_dtype=None)
        print(f"wrote {json_path}", flush=True)
        if args.exact_hidden_depth:
            row["hidden_vs_exact"] = hidden_vs_exact(name, shape, args.exact_hidden_depth)
            write_pair(args.output, result, markdown(result), seeds=[0], started=started, train_dtype=None)
            print(f"wrote {json_path} again, with the hidden site", flush=True)
        return 0
    if not args.skip_smollm2:
        result["smollm2"] = smollm2(previous_solvers(args.previous))
        print(result["smollm2"], flush=True)
    name, shape = "llama-2-7b", SHAPES["llama-2-7b"]
    result["shapes"][name] = model_shape(name, shape, shape[2], shape[2], args.hidden_depth)
    name, shape = "llama-2-70b", SHAPES["llama-2-70b"]
    result["shapes"][name] = model_shape(name, shape, args.layers_70b, args.hidden_depth_70b, 0)
    json_path, _ = write_pair(args.output, result, markdown(result), seeds=[0], started=started, train_dtype=None)
    print(f"wrote {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
