"""What hardening costs per learning step: the Hungarian solves (``sinkhorn.hungarian``, SciPy's
``linear_sum_assignment`` on the CPU, one per block) of every learnable block of a model, at the
block counts of SmolLM2-135M, Llama-3.2-1B and LLaMA-2-7B (fold exact, block 64: one ``mlp_out``
and one ``attn_out`` site per layer, ``C_in / 64`` blocks each). A step hardens every block once
(straight-through forward) and a selection pass once more; this is the CPU time a GPU step waits
for. Medians of 11 runs, on 1 thread and on ``--threads`` (default: every core; ``hungarian`` solves
chunks of blocks on ``torch.get_num_threads()`` threads). Random matrices: the worst case, where SciPy
solves every block.

``--trace`` records hardening during a real learning run instead (SmolLM2-135M, end_to_end, exact
fold, ``--steps`` steps (default 80), ``--num-samples`` x 512 calibration tokens): at every call,
the seconds of ``hungarian`` and how many blocks a batched shortcut would solve, those whose
column-wise argmax already is a permutation (then that permutation is optimal). The shortcut was
tried and dropped: after the first steps no block qualifies (docs/scaling.md).

    python bench/hardening.py --output bench/results/hardening-cpu.json
    python bench/hardening.py --trace --steps 20 --output bench/results/hardening-trace-smollm2-e2e.json
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from result_files import write_pair

# (name, decoder layers, intermediate size, hidden size): blocks = layers * (intermediate + hidden) / 64
SHAPES = (("smollm2-135m", 30, 1536, 576), ("llama-3.2-1b", 16, 8192, 2048), ("llama-2-7b", 32, 11008, 4096))
BLOCK = 64


def time_hardening(blocks: int, threads: list[int], repeats: int = 11) -> dict[int, float]:
    """Median seconds of ``hungarian`` on ``blocks`` doubly stochastic 64 x 64 matrices, by thread
    count; the counts alternate within each repeat, so a busy moment of the host hits all of them."""
    from nmperm_plugin.core.sinkhorn import hungarian, log_sinkhorn

    soft = log_sinkhorn(torch.randn(blocks, BLOCK, BLOCK, generator=torch.Generator().manual_seed(0)), 5).exp()
    times: dict[int, list[float]] = {count: [] for count in threads}
    for _ in range(repeats):
        for count in threads:
            torch.set_num_threads(count)
            start = time.perf_counter()
            hungarian(soft)
            times[count].append(time.perf_counter() - start)
    return {count: statistics.median(t) for count, t in times.items()}


def argmax_is_permutation(mats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per matrix of ``[K, B, B]``: the column-wise argmax rows ``[K, B]`` and whether they form a
    permutation ``[K]`` (then it is the optimal assignment: every column's term at its maximum)."""
    rows = mats.argmax(dim=-2)
    return rows, (torch.zeros_like(rows).scatter_add_(-1, rows, torch.ones_like(rows)) == 1).all(dim=-1)


def shortcut_hungarian(soft: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The candidate: ``sinkhorn.hungarian`` with the blocks whose argmax is a permutation solved in one
    batch, SciPy for the others only. Returns the permutations and which blocks the shortcut solved."""
    from nmperm_plugin.core.sinkhorn import hungarian

    mats = soft.detach().float().reshape(-1, *soft.shape[-2:]).nan_to_num(nan=0.0)
    perms, solved = argmax_is_permutation(mats)
    if not solved.all():
        perms[~solved] = hungarian(mats[~solved])
    return perms.reshape(soft.shape[:-1]), solved


def trace_learning(num_samples: int, steps: int | None, seed: int) -> dict:
    """Hardening calls of one end_to_end learning run on SmolLM2-135M (see the module docstring)."""
    from nmperm_plugin import PermuteConfig, permute_
    from nmperm_plugin.core import permuter, sinkhorn
    from nmperm_plugin.data.text import load_texts, token_windows
    from nmperm_plugin.io.models import default_model_path, load_model

    calls, solve = [], sinkhorn.hungarian

    def traced(soft: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        _, solved = shortcut_hungarian(soft)
        shortcut = time.perf_counter() - start
        start = time.perf_counter()
        perms = solve(soft)
        scipy = time.perf_counter() - start
        calls.append(
            {"blocks": solved.numel(), "argmax_solved": int(solved.sum()), "seconds": shortcut, "scipy_seconds": scipy}
        )
        return perms

    sinkhorn.hungarian = permuter.hungarian = traced
    model, tokenizer = load_model(default_model_path())
    calibration = token_windows(tokenizer, load_texts("builtin:wiki-calibration"), num_samples, 512, seed=seed)
    permute_(model, calibration, PermuteConfig(objective="end_to_end", fold="exact", end_to_end_steps=steps, seed=seed))
    blocks = sum(c["blocks"] for c in calls)
    thirds = [calls[i * len(calls) // 3 : (i + 1) * len(calls) // 3] for i in range(3)]
    return {
        "calls": len(calls),
        "blocks": blocks,
        "argmax_share": sum(c["argmax_solved"] for c in calls) / blocks,
        "argmax_share_by_third": [sum(c["argmax_solved"] for c in t) / sum(c["blocks"] for c in t) for t in thirds],
        "seconds": sum(c["seconds"] for c in calls),
        "scipy_seconds": sum(c["scipy_seconds"] for c in calls),
        "seconds_by_third": [sum(c["seconds"] for c in t) for t in thirds],
        "scipy_seconds_by_third": [sum(c["scipy_seconds"] for c in t) for t in thirds],
    }


def trace_markdown(trace: dict) -> str:
    early, middle, late = (f"{100 * share:.1f}%" for share in trace["argmax_share_by_third"])
    return (
        "| hardening calls | blocks solved | argmax is a permutation | first / middle / last third of the calls "
        "| with the shortcut (s) | SciPy on every block (s) | speed-up |\n|---|---|---|---|---|---|---|\n"
        f"| {trace['calls']} | {trace['blocks']} | {100 * trace['argmax_share']:.1f}% | {early} / {middle} / {late} "
        f"| {trace['seconds']:.2f} | {trace['scipy_seconds']:.2f} "
        f"| {trace['scipy_seconds'] / trace['seconds']:.1f}x |\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("bench/results/hardening-cpu.json"))
    parser.add_argument("--trace", action="store_true", help="trace a real learning run instead (see above)")
    parser.add_argument("--num-samples", type=int, default=4, help="--trace: calibration windows of 512 tokens")
    parser.add_argument("--steps", type=int, help="--trace: learning steps (default: end_to_end's, 80 in exact)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[os.cpu_count() or 1], help="thread counts timed beside 1"
    )
    args = parser.parse_args(argv)
    started = time.time()
    host = {"machine": platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__}
    if args.trace:
        trace = trace_learning(args.num_samples, args.steps, args.seed)
        settings = {"num_samples": args.num_samples, "steps": args.steps, "seed": args.seed}
        write_pair(
            args.output, {"host": host} | settings | trace, trace_markdown(trace), seeds=[args.seed], started=started
        )
        print(trace_markdown(trace))
        return 0
    threads = sorted({1, *args.threads})
    rows = []
    for name, layers, intermediate, hidden in SHAPES:
        blocks = layers * (intermediate + hidden) // BLOCK
        seconds = time_hardening(blocks, threads)
        rows.append({"shape": name, "blocks": blocks, "seconds_by_threads": seconds, "seconds": seconds[1]})
    most = threads[-1]
    lines = [
        f"| shape | blocks of 64 | Hungarian, 1 thread (s) | per block (ms) | {most} threads (s) | speed-up |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['shape']} | {r['blocks']} | {r['seconds']:.3f} | {1000 * r['seconds'] / r['blocks']:.3f} "
        f"| {r['seconds_by_threads'][most]:.3f} | {r['seconds'] / r['seconds_by_threads'][most]:.2f}x |"
        for r in rows
    ]
    result = {"host": host, "threads": threads, "rows": rows}
    write_pair(args.output, result, "\n".join(lines) + "\n", seeds=[0], started=started)  # the soft matrices' seed
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
