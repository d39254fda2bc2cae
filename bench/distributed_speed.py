"""Data-parallel learning on CPU: 2 gloo ranks with 1 thread each against 1 process with 2 threads,
on the real SmolLM2-135M, ``end_to_end`` (exact fold), the same seed and calibration windows.

Each configuration runs in its own processes (``torchrun --standalone`` for the ranks), one after
the other; ``--repeats`` alternates them and the table shows medians. Timed: the whole permutation
run (dense pass included), the learner (``learn``), its selections, and the learning steps (learner
minus selections) per step. The permutations of every run are compared with the first 1-rank run's.

    python bench/distributed_speed.py            # writes bench/results/distributed-cpu2-smollm2.json/.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from result_files import write_pair

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
RUN_TIMEOUT_S = 3 * 3600  # one configuration's learning run, model loading included
MODES = {"1 rank x 2 threads": (1, 2), "2 ranks x 1 thread": (2, 1), "1 rank x 1 thread": (1, 1)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--steps", type=int, default=8, help="end_to_end learner steps")
    parser.add_argument("--num-samples", type=int, default=8, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per calibration window")
    parser.add_argument("--sequences-per-step", type=int, default=2)
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES)[:2])
    parser.add_argument("--output", type=Path, default=RESULTS / "distributed-cpu2-smollm2.json")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # internal: run one configuration
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def worker(args: argparse.Namespace) -> None:
    """One configuration, in this process (one rank of it under torchrun); rank 0 writes ``args.worker``."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(args.threads)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
    import nmperm_plugin.learn.objectives as strategies
    from nmperm_plugin import PermuteConfig, permute_and_prune_
    from nmperm_plugin.data.text import load_texts, token_windows
    from nmperm_plugin.io.models import default_model_path, load_model
    from nmperm_plugin.learn import losses as objectives
    from nmperm_plugin.runtime import distributed

    model, tokenizer = load_model(default_model_path())
    calibration = token_windows(tokenizer, load_texts("builtin:wiki-calibration"), args.num_samples, args.seq_len, 0)
    config = PermuteConfig(
        objective="end_to_end",
        end_to_end_steps=args.steps,
        sequences_per_step=args.sequences_per_step,
        select_sequences=args.sequences_per_step,
    )
    seconds = {"learn": 0.0, "select": 0.0}
    real_learn, real_select = strategies.learn, objectives.WindowObjective.select

    def timed_learn(*a, **k):
        start = time.perf_counter()
        try:
            return real_learn(*a, **k)
        finally:
            seconds["learn"] += time.perf_counter() - start

    def timed_select(self, weights):
        start = time.perf_counter()
        try:
            return real_select(self, weights)
        finally:
            seconds["select"] += time.perf_counter() - start

    strategies.learn, objectives.WindowObjective.select = timed_learn, timed_select
    start = time.perf_counter()
    result = permute_and_prune_(model, calibration, config)
    total = time.perf_counter() - start
    if distributed.is_main():
        record = {
            "ranks": distributed.world_size(),
            "threads_per_rank": torch.get_num_threads(),
            "run_seconds": total,
            "learn_seconds": seconds["learn"],
            "select_seconds": seconds["select"],
            "step_seconds": (seconds["learn"] - seconds["select"]) / args.steps,
            "train_dtype": str(objectives.training_dtype(config.train_dtype, torch.device("cpu")) or "float32"),
            "permutations": {name: perm.tolist() for name, perm in result.perms.items()},
            "best_select": min(h["select"] for h in result.history["model"] if h["select"] is not None),
        }
        args.worker.write_text(json.dumps(record))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def run_mode(args: argparse.Namespace, ranks: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "result.json"
        own = [__file__, "--worker", str(out), "--threads", str(threads), "--steps", str(args.steps)]
        own += ["--num-samples", str(args.num_samples), "--seq-len", str(args.seq_len)]
        own += ["--sequences-per-step", str(args.sequences_per_step)]
        if ranks == 1:
            command = [sys.executable, *own]
        else:
            command = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", str(ranks)]
            command += own
        env = os.environ | {"OMP_NUM_THREADS": str(threads)}
        start = time.perf_counter()
        subprocess.run(command, check=True, env=env, cwd=ROOT, timeout=RUN_TIMEOUT_S)
        record = json.loads(out.read_text())
        record["process_seconds"] = time.perf_counter() - start  # with imports and model loading
        return record


def markdown(result: dict) -> str:
    setup = result["setup"]
    lines = [
        f"SmolLM2-135M, end_to_end (exact fold, train dtype {result['runs'][0]['train_dtype']}), "
        f"{setup['steps']} learner steps of {setup['sequences_per_step']} sequences x {setup['seq_len']} tokens, "
        f"{setup['num_samples']} calibration windows; medians of {setup['repeats']} run(s) per configuration, "
        f"on {result['host']['cpus']} CPU cores.",
        "",
        "| configuration | learning run (s) | learner (s) | per step (s) | selections (s) | whole process (s) "
        f"| best selection CE | sites differing from {next(iter(result['summary']))} (of {result['sites']}) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in result["summary"].items():
        lines.append(
            f"| {name} | {row['run_seconds']:.1f} | {row['learn_seconds']:.1f} | {row['step_seconds']:.2f} | "
            f"{row['select_seconds']:.1f} | {row['process_seconds']:.1f} | {row['best_select']:.4f} | "
            f"{row['differing_sites']} |"
        )
    names = list(result["summary"])
    lines += ["", f"Speed-up of the learning steps, {names[1]} over {names[0]}: {result['step_speedup']:.2f}x."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    started = time.time()
    args = parse_args(argv)
    if args.worker is not None:
        worker(args)
        return
    runs = []
    for _ in range(args.repeats):
        for name in args.modes:
            print(f"{name} ...", flush=True)
            runs.append({"configuration": name} | run_mode(args, *MODES[name]))
    reference = runs[0]["permutations"]
    for run in runs:
        run["differing_sites"] = sum(run["permutations"][site] != perm for site, perm in reference.items())
    summary = {}
    for name in args.modes:
        mine = [r for r in runs if r["configuration"] == name]
        keys = ("run_seconds", "learn_seconds", "select_seconds", "step_seconds", "process_seconds", "best_select")
        summary[name] = {k: statistics.median(r[k] for r in mine) for k in keys}
        summary[name]["same_permutations"] = all(r["permutations"] == reference for r in mine)
        summary[name]["differing_sites"] = max(r["differing_sites"] for r in mine)
    names = args.modes
    result = {
        "setup": {k: getattr(args, k) for k in ("steps", "num_samples", "seq_len", "sequences_per_step", "repeats")},
        "host": {"cpus": os.cpu_count()},
        "summary": summary,
        "sites": len(reference),
        "step_speedup": summary[names[0]]["step_seconds"] / summary[names[1]]["step_seconds"],
        "runs": [{k: v for k, v in r.items() if k != "permutations"} for r in runs],
    }
    write_pair(args.output, result, markdown(result), seeds=[0], started=started)  # PermuteConfig's seed 0
    print(markdown(result))


if __name__ == "__main__":
    main()
