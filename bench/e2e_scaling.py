"""Time and peak memory of one ``end_to_end`` learning step against model size, with and without
layer checkpointing, on random-weight Llama models of real shapes.

Each (shape, checkpointing) runs in a fresh process, so its peak memory is its own (peak RSS on a
CPU, ``torch.cuda.max_memory_allocated`` on a GPU). A step is the loss over ``--sequences`` x
``--seq-len`` tokens, its backward into every site's cost matrices and the Adam update, exactly as
the learner runs it (``WindowObjective`` over all layers, fold exact, Wanda-like scores); selection
(a forward of ``select_sequences`` sequences) is timed apart. Medians of ``--steps`` steps after one
warm-up step. Writes ``bench/results/e2e-scaling-<device>.json`` and a markdown table.

    python bench/e2e_scaling.py                                   # CPU: 135M, 360M, 1B shapes
    python bench/e2e_scaling.py --device cuda --shapes llama-3.2-1b llama-3-8b --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

from models import LLAMA_SHAPES, random_llama
from result_files import write_pair
from workers import run_worker

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
WORKER_TIMEOUT_S = 3 * 3600  # one shape and setting: a few steps of a 1B model on 2 cores


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shapes", nargs="+", default=["smollm2-135m", "smollm2-360m", "llama-3.2-1b"], choices=list(LLAMA_SHAPES)
    )
    parser.add_argument("--checkpointing", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="the model's weights")
    parser.add_argument("--train-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--sequences", type=int, default=1, help="sequences per step (the default config's)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    parser.add_argument("--output", type=Path)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def worker(job: dict) -> dict:
    import torch

    from nmperm_plugin import PermuteConfig
    from nmperm_plugin.learn.layers import capture_layer_inputs
    from nmperm_plugin.learn.losses import training_dtype
    from nmperm_plugin.learn.pipeline import make_run
    from nmperm_plugin.learn.window import layer_stack, window_learning

    device = torch.device(job["device"])
    model = random_llama(job["shape"], dtype=getattr(torch, job["dtype"]), device=device)
    ids = torch.randint(0, model.config.vocab_size, (job["sequences"] + 1, job["seq_len"]), device=device)
    config = PermuteConfig(
        method="learned", init="identity", train_dtype=job["train_dtype"],
        sequences_per_step=job["sequences"], select_sequences=job["sequences"],
    )  # fmt: skip
    run = make_run(model, ids, config)
    hidden, kwargs = capture_layer_inputs(model, run.layers, run.input_ids)
    # dense targets as the objective keeps them (on the CPU); scores: |W| (a step's cost does not depend on them)
    scores = {n: lin.weight.abs().float() for n, lin in run.linears.items()}
    _, dense = run.dense_pass(hidden, kwargs, [], keep_outputs=True, on=torch.device("cpu"))
    for site in run.sites:
        run.solve(site, scores)
    effective, objective = window_learning(  # the learner's own setup, over all layers
        run, layer_stack(run, kwargs), range(len(run.layers)), hidden, dense, scores,
        training_dtype(job["train_dtype"], device), job["checkpointing"] == "on",
    )  # fmt: skip
    optimizer = torch.optim.Adam(effective.permuters.parameters(), lr=config.lr)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    steps, selects = [], []
    for step in range(job["steps"] + 1):
        start = time.perf_counter()
        loss = objective.loss(effective.soft(0.5), step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        steps.append(time.perf_counter() - start)
        start = time.perf_counter()
        objective.select(effective.hard())
        if device.type == "cuda":
            torch.cuda.synchronize()
        selects.append(time.perf_counter() - start)
    parameters = sum(p.numel() for p in model.parameters())
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return job | {
        "parameters": parameters,
        "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "step_seconds": statistics.median(steps[1:]),
        "select_seconds": statistics.median(selects[1:]),
        "peak_bytes": peak,
        "dense_target_bytes": sum(t.numel() * t.element_size() for t in dense),
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "| shape | parameters | checkpointing | step (s) | selection (s) | peak memory (GiB) | weights (GiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['parameters'] / 1e9:.2f} B | {r['checkpointing']} | {r['step_seconds']:.2f} | "
            f"{r['select_seconds']:.2f} | {r['peak_bytes'] / 2**30:.2f} | {r['weight_bytes'] / 2**30:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    started = time.time()
    args = parse_args(argv)
    if args.worker:
        sys.path.insert(0, str(ROOT))
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    rows = []
    for shape in args.shapes:
        for checkpointing in args.checkpointing:
            job = dict(
                shape=shape, checkpointing=checkpointing, device=args.device, dtype=args.dtype,
                train_dtype=args.train_dtype, sequences=args.sequences, seq_len=args.seq_len, steps=args.steps,
            )  # fmt: skip
            rows.append(run_worker(__file__, job, WORKER_TIMEOUT_S, cwd=ROOT, record_errors=True))
            if "error" not in rows[-1]:
                print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    result = {"machine": {"platform": platform.platform(), "device": args.device}, "rows": rows}
    path = args.output or RESULTS / f"e2e-scaling-{args.device}.json"
    path, _ = write_pair(
        path,
        result,
        markdown([r for r in rows if "error" not in r]) + "\n",
        seeds=[0],  # torch.manual_seed(0) for the random weights and tokens
        started=started,
        train_dtype=args.train_dtype,
        device=args.device,
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
