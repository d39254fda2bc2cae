"""Layer-sharded learning (``shard_weights``) against the replicated data-parallel mode: memory per
rank and time per step, 2 gloo ranks x 1 thread, on a random-weight Llama whose decoder layers hold
almost all of its weights (hidden 1024, 20 layers, intermediate 4096, 16 query / 4 KV heads, a
2048-token vocabulary: 306M parameters, float32).

Both modes run ``end_to_end`` (exact fold, identity start, layer checkpointing on in both, so that
they do the same arithmetic and differ only in where the weights are), in fresh ``torchrun``
processes, one mode after the other. Per rank:

* the bytes this rank keeps, as learning starts, of the decoder layers' parameters and of the
  learned linears' scores (the sizes of the storages behind them: exact, whatever the allocator);
* peak RSS of the start (the dense pass, the scores and the solver starts) and, apart, of the
  learning (its steps and selections): ``VmHWM``, reset through ``/proc/self/clear_refs`` as each
  begins (the model built and its layer inputs captured before); glibc's mmap threshold is pinned,
  so that freed tensors go back to the system and RSS follows the tensors;
* RSS before the model is built (torch and the libraries), and the peak RSS of building the whole
  model (which every rank does before it shards), of the end (the retained ratios, the masks and, when
  sharded, gathering the weights back whole) and of the whole process (the largest of them all);
* seconds per learner step (the learner's time less its selections, over the steps) and the bytes
  of the whole tensors all-gathered per step and per selection.

    python bench/sharded_learning.py      # about 5 minutes on 2 cores; bench/results/sharded-learning-cpu2.*

``--backend nccl`` (2 CUDA GPUs or more): the same 2 ranks under NCCL, rank r on ``cuda:LOCAL_RANK``; the
model stays on the CPU and each layer is onloaded to the rank's GPU when it runs (so the shards stay on
the CPU and are copied to the GPU for each gather, as in docs/distributed.md's 70B plan), and each rank
also records its peak GPU memory (``torch.cuda.max_memory_allocated``) per phase. bench/gpu_e2e.sh runs it:

    python bench/sharded_learning.py --backend nccl --output OUT   # default bench/results/sharded-learning-nccl2.*
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from models import random_llama
from result_files import write_pair

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
RUN_TIMEOUT_S = 1800  # one mode: building two models, a dense pass, a few steps
OUTPUTS = {"gloo": "sharded-learning-cpu2.json", "nccl": "sharded-learning-nccl2.json"}  # default --output
SHAPE = dict(hidden_size=1024, num_hidden_layers=20, intermediate_size=4096, num_attention_heads=16)
SHAPE |= dict(num_key_value_heads=4, vocab_size=2048, tie_word_embeddings=True, max_position_embeddings=256)
MODES = ("replicated", "sharded")
GIB = 2**30


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2, help="end_to_end learner steps")
    parser.add_argument("--num-samples", type=int, default=4, help="calibration windows (random token ids)")
    parser.add_argument("--seq-len", type=int, default=32, help="tokens per calibration window")
    parser.add_argument("--layers", type=int, default=SHAPE["num_hidden_layers"], help="decoder layers")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument(
        "--backend", choices=tuple(OUTPUTS), default="gloo",
        help="gloo: 2 CPU ranks; nccl: 2 ranks on cuda:0 and cuda:1, the model onloaded from the CPU",
    )  # fmt: skip
    parser.add_argument("--output", type=Path, help="default: bench/results/sharded-learning-{cpu2,nccl2}.json")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # internal: one rank of one mode
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.output = args.output or RESULTS / OUTPUTS[args.backend]
    return args


def _peak_rss() -> int:
    """This process's peak resident set since the last reset (``VmHWM``), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _rss() -> int:
    """This process's resident set now, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: the peak RSS restarts from the current RSS


def worker(args: argparse.Namespace) -> None:
    """One rank of one mode; every rank writes ``args.worker``.rank<r>.json."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    device = None  # gloo: compute where the weights are, the CPU
    if args.backend == "nccl":
        from nmperm_plugin.runtime import distributed

        device = distributed.init_from_env("cuda")  # NCCL, this rank on cuda:LOCAL_RANK
    else:
        dist.init_process_group("gloo")
    from nmperm_plugin import PermuteConfig, permute_and_prune_
    from nmperm_plugin.learn import losses, run, window
    from nmperm_plugin.runtime import distributed, sharding

    def peak_gpu(key: str) -> None:
        """NCCL: record this rank's peak GPU memory since the last reset as ``peak_gpu_<key>_bytes``, reset it."""
        if device is not None:
            record[f"peak_gpu_{key}_bytes"] = torch.cuda.max_memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)

    rss_before_model = _rss()
    model = random_llama(SHAPE, num_hidden_layers=args.layers)  # seeded: the same random model on every rank
    ids = torch.randint(
        0, SHAPE["vocab_size"], (args.num_samples, args.seq_len), generator=torch.Generator().manual_seed(0)
    )
    config = PermuteConfig(
        objective="end_to_end", end_to_end_steps=args.steps, init="identity", sequences_per_step=2, select_sequences=2,
        layer_checkpointing="on", shard_weights=args.mode == "sharded", seed=0,
    )  # fmt: skip
    layer_parameters = [p for layer in model.model.layers for p in layer.parameters()]
    record: dict = {
        "rank": distributed.rank(),
        "rss_before_model_bytes": rss_before_model,
        "parameters": sum(p.numel() for p in model.parameters()),
        "layer_weight_bytes_whole": sum(p.numel() * p.element_size() for p in layer_parameters),
        # every decoder-layer matrix is a pruned linear here (exact fold, nothing ignored): float32 scores
        "score_bytes_whole": sum(p.numel() for p in layer_parameters if p.dim() >= 2) * 4,
    }
    gathered = {"step": 0, "select": 0, "other": 0}
    phase = ["other"]
    real_gather, real_dense, real_learn, real_select = (
        sharding._all_gather, run.Run.dense_pass, window.learn, losses.WindowObjective.select
    )  # fmt: skip

    def counting_gather(output, local, *a, **k):
        gathered[phase[0]] += output.numel() * output.element_size()
        return real_gather(output, local, *a, **k)

    def dense_pass(self, *a, **k):
        record["peak_rss_build_bytes"] = _peak_rss()  # building the whole model, capturing the layer inputs
        _reset_peak_rss()  # from here on: the run's memory, not the whole model's build
        peak_gpu("build")
        start = time.perf_counter()
        try:
            return real_dense(self, *a, **k)
        finally:
            record["dense_pass_seconds"] = time.perf_counter() - start

    def select(self, weights):
        phase[0], start = "select", time.perf_counter()
        try:
            return real_select(self, weights)
        finally:
            record["select_seconds"] = record.get("select_seconds", 0.0) + time.perf_counter() - start
            record["selections"] = record.get("selections", 0) + 1
            phase[0] = "step"

    def learn(effective, *a, **k):
        record["peak_rss_start_bytes"] = _peak_rss()  # the dense pass, the scores, the solver starts
        _reset_peak_rss()
        peak_gpu("start")
        record["layer_weight_bytes_held"] = sharding.storage_bytes(layer_parameters)
        record["score_bytes_held"] = sharding.storage_bytes(m.scores for m in effective.members)
        phase[0], start = "step", time.perf_counter()
        try:
            return real_learn(effective, *a, **k)
        finally:
            record["learn_seconds"] = time.perf_counter() - start
            record["peak_rss_learning_bytes"] = _peak_rss()
            _reset_peak_rss()
            peak_gpu("learning")
            phase[0] = "other"

    sharding._all_gather, run.Run.dense_pass, window.learn = counting_gather, dense_pass, learn
    losses.WindowObjective.select = select
    start = time.perf_counter()
    permute_and_prune_(model, ids, config, device)
    record["run_seconds"] = time.perf_counter() - start
    record["step_seconds"] = (record["learn_seconds"] - record["select_seconds"]) / args.steps
    record["gathered_bytes_per_step"] = gathered["step"] / args.steps
    record["gathered_bytes_per_selection"] = gathered["select"] / record["selections"]
    record["gathered_bytes_outside_learning"] = gathered["other"]
    record["peak_rss_end_bytes"] = _peak_rss()
    peaks = ("build", "start", "learning", "end")  # clear_refs resets ru_maxrss too: the largest window's
    record["peak_rss_process_bytes"] = max(record[f"peak_rss_{peak}_bytes"] for peak in peaks)
    if device is not None:
        peak_gpu("end")
        record["peak_gpu_process_bytes"] = max(record[f"peak_gpu_{peak}_bytes"] for peak in peaks)
        record["gpu"] = torch.cuda.get_device_name(device)
    Path(f"{args.worker}.rank{distributed.rank()}.json").write_text(json.dumps(record))
    dist.barrier()
    dist.destroy_process_group()


def run_mode(args: argparse.Namespace, mode: str) -> list[dict]:
    """Both ranks' records of ``mode``, run under torchrun."""
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "result"
        torchrun = Path(sys.executable).parent / "torchrun"  # else the module it runs (a python without its script)
        launcher = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
        command = [*launcher, "--standalone", "--nproc-per-node", "2", __file__, "--backend", args.backend]
        command += ["--worker", str(out), "--mode", mode, "--steps", str(args.steps), "--layers", str(args.layers)]
        command += ["--num-samples", str(args.num_samples), "--seq-len", str(args.seq_len)]
        # freed tensors go back to the system at once, so that RSS follows the tensors a rank holds
        env = os.environ | {"OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
        subprocess.run(command, check=True, env=env, cwd=ROOT, timeout=RUN_TIMEOUT_S)
        return [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(2)]


def summary(records: dict[str, list[dict]]) -> dict:
    """Per mode, the largest figure over its ranks (the rank that bounds the memory and the time)."""
    keys = (
        "layer_weight_bytes_held", "score_bytes_held", "rss_before_model_bytes", "peak_rss_build_bytes",
        "peak_rss_start_bytes", "peak_rss_learning_bytes", "peak_rss_end_bytes", "peak_rss_process_bytes",
        "step_seconds", "select_seconds", "dense_pass_seconds", "run_seconds", "gathered_bytes_per_step",
        "gathered_bytes_per_selection",
    )  # fmt: skip
    gpu = tuple(f"peak_gpu_{peak}_bytes" for peak in ("build", "start", "learning", "end", "process"))
    keys += tuple(k for k in gpu if all(k in r for ranks in records.values() for r in ranks))  # NCCL only
    return {mode: {k: max(r[k] for r in ranks) for k in keys} for mode, ranks in records.items()}


def markdown(result: dict) -> str:
    setup, rows = result["setup"], result["summary"]
    first = next(iter(result["runs"].values()))[0]
    ranks = f"2 gloo ranks x 1 thread on {result['host']['cpus']} CPU cores"
    if setup.get("backend") == "nccl":
        ranks = (
            f"2 NCCL ranks, one {first['gpu']} each (the model kept on the CPU, each layer onloaded to the rank's "
            f"GPU: the shards stay on the CPU), 1 CPU thread each on {result['host']['cpus']} CPU cores"
        )
    lines = [
        f"Random-weight Llama, {first['parameters'] / 1e6:.0f}M parameters (hidden {SHAPE['hidden_size']}, "
        f"{setup['layers']} layers, intermediate {SHAPE['intermediate_size']}, vocabulary {SHAPE['vocab_size']}, "
        f"float32), end_to_end exact, identity start, layer checkpointing on, {setup['steps']} steps of 2 x "
        f"{setup['seq_len']} tokens; {ranks}. Decoder-layer "
        f"weights whole: {first['layer_weight_bytes_whole'] / GIB:.2f} GiB, their scores whole: "
        f"{first['score_bytes_whole'] / GIB:.2f} GiB. Per mode the largest value over the 2 ranks.",
        "",
        "| mode | layer weights held (GiB) | scores held (GiB) | RSS before the model (GiB) | peak RSS: build "
        "| start | learning | end | whole process (GiB) | s / step | s / selection | gathered / step (GiB) "
        "| gathered / selection (GiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, row in rows.items():
        lines.append(
            f"| {mode} | {row['layer_weight_bytes_held'] / GIB:.2f} | {row['score_bytes_held'] / GIB:.2f} | "
            f"{row['rss_before_model_bytes'] / GIB:.2f} | {row['peak_rss_build_bytes'] / GIB:.2f} | "
            f"{row['peak_rss_start_bytes'] / GIB:.2f} | {row['peak_rss_learning_bytes'] / GIB:.2f} | "
            f"{row['peak_rss_end_bytes'] / GIB:.2f} | {row['peak_rss_process_bytes'] / GIB:.2f} | "
            f"{row['step_seconds']:.1f} | {row['select_seconds'] / max(setup['selections'], 1):.1f} | "
            f"{row['gathered_bytes_per_step'] / GIB:.2f} | {row['gathered_bytes_per_selection'] / GIB:.2f} |"
        )
    if any("peak_gpu_process_bytes" in row for row in rows.values()):
        lines += [
            "",
            "| mode | peak GPU memory allocated (GiB): build | start | learning | end | whole process |",
            "|---|---|---|---|---|---|",
        ]
        for mode, row in rows.items():
            peaks = ("build", "start", "learning", "end", "process")
            lines.append(f"| {mode} | " + " | ".join(f"{row[f'peak_gpu_{p}_bytes'] / GIB:.2f}" for p in peaks) + " |")
    if "ratios" in result:
        ratio = result["ratios"]
        lines += [
            "",
            f"Sharded over replicated: weights + scores held {ratio['held']:.2f}x, peak RSS of the start "
            f"{ratio['peak_rss_start']:.2f}x, of the learning {ratio['peak_rss_learning']:.2f}x, time per step "
            f"{ratio['step_seconds']:.2f}x. The start's peak is the solver starts': each stacks the whole scores of "
            "its site on the CPU (the exact fold's hidden site: 5 of a layer's 7 linears in every layer).",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    started = time.time()
    args = parse_args(argv)
    if args.worker is not None:
        worker(args)
        return
    if args.backend == "nccl":
        import torch

        if (gpus := torch.cuda.device_count()) < 2:
            raise SystemExit(f"--backend nccl runs 2 ranks, one GPU each: it needs 2 CUDA GPUs and torch sees {gpus}")
    runs = {}
    for mode in args.modes:
        print(f"{mode} ...", flush=True)
        runs[mode] = run_mode(args, mode)
    rows = summary(runs)
    result = {
        "setup": {k: getattr(args, k) for k in ("steps", "num_samples", "seq_len", "layers")}
        | {"shape": SHAPE, "selections": runs[args.modes[0]][0]["selections"], "ranks": 2, "threads_per_rank": 1}
        | ({"backend": "nccl", "placement": "onload"} if args.backend == "nccl" else {}),
        "host": {"cpus": os.cpu_count()},
        "measured": {
            "held": "storage bytes of the decoder layers' parameters and of the learned linears' scores at the start "
            "of learning",
            "peak_rss_start": "VmHWM from the dense pass to the start of learning (reset via /proc/self/clear_refs; "
            "MALLOC_MMAP_THRESHOLD_=131072)",
            "peak_rss_learning": "VmHWM over the learning's steps and selections (reset as it starts)",
            "peak_rss_build": "VmHWM from the start of the process to the dense pass (the whole model built)",
            "peak_rss_end": "VmHWM after the learning (retained ratios, masks, the weights gathered back whole)",
            "peak_rss_process": "the largest of the four windows (clear_refs resets ru_maxrss as well)",
            "gathered": "bytes of the whole tensors all-gathered (each rank receives (ranks-1)/ranks of them)",
        }
        | (
            {"peak_gpu": "torch.cuda.max_memory_allocated of the same four windows (reset as each begins)"}
            if args.backend == "nccl"
            else {}
        ),
        "summary": rows,
        "runs": runs,
    }
    if set(MODES) <= set(rows):
        sharded, replicated = rows["sharded"], rows["replicated"]
        held = [row["layer_weight_bytes_held"] + row["score_bytes_held"] for row in (sharded, replicated)]
        result["ratios"] = {
            "held": held[0] / held[1],
            "peak_rss_start": sharded["peak_rss_start_bytes"] / replicated["peak_rss_start_bytes"],
            "peak_rss_learning": sharded["peak_rss_learning_bytes"] / replicated["peak_rss_learning_bytes"],
            "step_seconds": sharded["step_seconds"] / replicated["step_seconds"],
        }
    device = "cuda" if args.backend == "nccl" else "cpu"
    write_pair(args.output, result, markdown(result), seeds=[0], started=started, train_dtype="auto", device=device)
    print(markdown(result))


if __name__ == "__main__":
    main()
