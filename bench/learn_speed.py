"""Speed of the learner's pieces, side by side in one process, on the real SmolLM2-135M.

1. One effective weight ``W_eff`` forward and backward, per SmolLM2 linear shape: the fast path
   (:meth:`BlockPermuter.effective_weight`) against the formula it implements
   (:func:`block_matrix_effective_weight`, dense per-block products differentiated by autograd).
2. One ``end_to_end`` learning step (loss and backward over the whole model) with ``train_dtype``
   float32 and bfloat16, alternated, and one selection pass (always float32).
3. The RIA-style assignment of one stacked site with the slot-gain chunk bound at 128 MB and 16 MB.

Medians of ``--repeats``; writes ``bench/results/learn-speed-<time>.json`` and a markdown table.

    python bench/learn_speed.py
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from result_files import write_pair

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SHAPES = {"q_proj": (576, 576), "gate_proj": (1536, 576), "down_proj": (576, 1536)}  # [out, in]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--num-samples", type=int, default=16, help="calibration windows of 512 tokens")
    parser.add_argument("--output", type=Path)
    return parser.parse_args(argv)


def median_seconds(run, repeats: int) -> float:
    run()  # warm-up: first calls pay for allocation and dispatch caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def effective_weight_row(name: str, out: int, channels: int, generator: torch.Generator, repeats: int) -> dict:
    from nmperm_plugin.core.nm import NMPattern
    from nmperm_plugin.core.permuter import BlockPermuter, block_matrix_effective_weight

    pattern = NMPattern(2, 4)
    weight = torch.randn(out, channels, generator=generator)
    scores = weight.abs() * torch.rand(channels, generator=generator)
    permuter = BlockPermuter(torch.randperm(channels, generator=generator), 64, noise=1.0, generator=generator)

    def fast():
        matrices, perm = permuter.sample(0.5, 5)
        permuter.effective_weight(weight, scores, matrices, perm, pattern, 0.5).square().sum().backward()

    def formula():
        matrices, _ = permuter.sample(0.5, 5)
        block_matrix_effective_weight(permuter, weight, scores, matrices, pattern, 0.5).square().sum().backward()

    times = {"fast": median_seconds(fast, repeats), "formula": median_seconds(formula, repeats)}
    return {"linear": name, "shape": [out, channels]} | times | {"ratio": times["formula"] / times["fast"]}


def effective_weight_rows(repeats: int) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    return [effective_weight_row(name, *shape, generator, repeats) for name, shape in SHAPES.items()]


def end_to_end_rows(num_samples: int, repeats: int) -> dict:
    """Build the end_to_end objective as the pipeline does (gather), then time its passes."""
    import nmperm_plugin.learn.objectives as strategies
    import nmperm_plugin.learn.pipeline as pipeline
    from nmperm_plugin import PermuteConfig
    from nmperm_plugin.data.text import load_texts, token_windows
    from nmperm_plugin.io.models import default_model_path, load_model

    model, tokenizer = load_model(default_model_path())
    calibration = token_windows(tokenizer, load_texts("builtin:wiki-calibration"), num_samples, 512, seed=0)
    timings: dict[str, list[float]] = {"float32": [], "bfloat16": [], "select": []}

    def timed_learn(effective, objective, config, description):
        optimizer = torch.optim.Adam(effective.permuters.parameters(), lr=config.lr)
        for _ in range(repeats):
            for name, dtype in (("float32", None), ("bfloat16", torch.bfloat16)):  # alternated
                objective.autocast = dtype
                start = time.perf_counter()
                loss = objective.loss(effective.soft(0.5), 0)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                timings[name].append(time.perf_counter() - start)
            start = time.perf_counter()
            objective.select(effective.hard())
            timings["select"].append(time.perf_counter() - start)
        return effective.hard_perms(), []

    real_learn, strategies.learn = strategies.learn, timed_learn
    try:
        config = PermuteConfig(objective="end_to_end", fold="gather", end_to_end_steps=1)
        pipeline.permute_and_prune_(model, calibration, config)
    finally:
        strategies.learn = real_learn
    medians = {name: statistics.median(values) for name, values in timings.items()}
    return medians | {"ratio_float32_over_bfloat16": medians["float32"] / medians["bfloat16"], "all": timings}


def assignment_rows(repeats: int) -> list[dict]:
    import nmperm_plugin.core.solvers as baselines
    from nmperm_plugin.core.nm import NMPattern

    generator = torch.Generator().manual_seed(0)
    norms = torch.empty(576).exponential_(generator=generator) ** 2
    scores = torch.randn(3072, 576, generator=generator).abs() * norms  # gate/up rows of one layer's mlp_in
    default, rows = baselines._CHUNK_ELEMENTS, []
    try:
        for elements in (2**25, 2**22):
            baselines._CHUNK_ELEMENTS = elements
            run = lambda: baselines.assignment(scores, NMPattern(2, 4))  # noqa: E731
            rows.append({"chunk_elements": elements, "seconds": median_seconds(run, repeats)})
    finally:
        baselines._CHUNK_ELEMENTS = default
    return rows


def markdown(result: dict) -> str:
    lines = ["| W_eff forward+backward | fast (ms) | formula (ms) | formula / fast |", "|---|---|---|---|"]
    for row in result["effective_weight"]:
        lines.append(
            f"| {row['linear']} {row['shape']} | {row['fast'] * 1e3:.1f} | {row['formula'] * 1e3:.1f} | "
            f"{row['ratio']:.2f}x |"
        )
    e2e = result["end_to_end"]
    lines += [
        "",
        "| end_to_end pass (gather, 2 windows per step, 4 to select) | median (s) |",
        "|---|---|",
        f"| learning step, float32 | {e2e['float32']:.2f} |",
        f"| learning step, bfloat16 autocast | {e2e['bfloat16']:.2f} |",
        f"| float32 / bfloat16 | {e2e['ratio_float32_over_bfloat16']:.2f}x |",
        f"| selection (float32) | {e2e['select']:.2f} |",
        "",
        "| RIA-style assignment, 3072 x 576 | median (s) |",
        "|---|---|",
    ]
    lines += [f"| chunk {row['chunk_elements']} elements | {row['seconds']:.2f} |" for row in result["assignment"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    started = time.time()
    args = parse_args(argv)
    result = {
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "effective_weight": effective_weight_rows(args.repeats),
        "assignment": assignment_rows(args.repeats),
        "end_to_end": end_to_end_rows(args.num_samples, args.repeats),
    }
    output = args.output or RESULTS / f"learn-speed-{time.strftime('%Y%m%d-%H%M%S')}.json"
    table = markdown(result)
    write_pair(output, result, table, seeds=[0], started=started)  # the rows time float32 and bfloat16 both
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
