"""The vocabulary head's cost in a learning step, with the whole logits (before) and by chunks of
positions (after, ``nmperm_plugin.arch.head.TokenHead``), at 128k-token vocabularies.

Two kinds of case, each in a fresh process so that its peak memory (peak RSS on a CPU,
``torch.cuda.max_memory_allocated`` on a GPU) is its own:

- ``step``: one ``end_to_end`` learning step of a random-weight Llama-3.2-1B shape (hidden 2048,
  intermediate 8192, 32 / 8 heads, vocabulary 128256, tied) with ``--layers`` of its 16 decoder
  layers, exactly as the learner runs it (``WindowObjective`` over all its layers, fold exact,
  default ``sequences_per_step`` 1 x ``--seq-len`` 512, no layer checkpointing as on a CPU), then the
  head alone (final norm, vocabulary projection, next-token cross-entropy, its backward) on the
  same number of positions, in the same process: the head's share of the step. Fewer layers than
  16 keep the run to minutes on 2 cores; the share of the 16-layer step is extrapolated from them
  (everything but the head scales with the layers) and labelled so.
- ``head``: the head alone at the 1B (hidden 2048) and 8B (hidden 4096) shapes, vocabulary 128256,
  for ``--positions``: its time and the memory it adds to the process (peak RSS over the RSS before).

Medians of ``--steps`` after one warm-up. Writes ``bench/results/head-cost-<device>.json`` and a
markdown table; ``--render FILE.json`` rewrites a result's markdown from its JSON (its stamp kept).

    python bench/head_cost.py                     # CPU, float32: 4 of 16 layers, 1 x 512 tokens
    python bench/head_cost.py --kinds head --modes chunked --logits-per-chunk 16777216   # smaller chunks
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

from models import LLAMA_SHAPES, random_llama
from result_files import header_line, result_pair, write_pair
from workers import run_worker

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
WORKER_TIMEOUT_S = 1800
VOCAB = LLAMA_SHAPES["llama-3.2-1b"]["vocab_size"]  # 128,256, as Llama 3's
HEAD_SHAPES = {name: LLAMA_SHAPES[name]["hidden_size"] for name in ("llama-3.2-1b", "llama-3-8b")}  # before the head


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the 1B shape's 16 in the step")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--sequences", type=int, default=1, help="sequences per step (the default config's)")
    parser.add_argument("--positions", type=int, nargs="+", default=[512, 2048], help="head-alone cases")
    parser.add_argument("--head-shapes", nargs="+", default=list(HEAD_SHAPES), choices=list(HEAD_SHAPES))
    parser.add_argument("--logits-per-chunk", type=int, help="the chunks' size (default: the package's)")
    parser.add_argument("--steps", type=int, default=2, help="timed repetitions (median reported)")
    parser.add_argument("--kinds", nargs="+", default=["step", "head"], choices=["step", "head"])
    parser.add_argument("--modes", nargs="+", default=["whole", "chunked"], choices=["whole", "chunked"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", type=Path)
    parser.add_argument("--render", type=Path, help="rewrite this result JSON's markdown, run nothing")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _rss_bytes() -> int:
    """This process's resident memory now (Linux ``/proc``)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize()


def _peak_bytes(device) -> int:
    """The peak memory since :func:`_reset_peak` (or the process's start): the peak RSS (Linux
    ``VmHWM``) on a CPU, ``torch.cuda.max_memory_allocated`` on a GPU."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak(device) -> None:
    """Start the peak over from the memory in use now (Linux: ``clear_refs`` 5 resets ``VmHWM``), so
    that a case's setup (random weights, dense pass) does not hide its step's peak."""
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")


def _timed(work, repeats: int, device) -> float:
    """The median seconds of ``repeats`` calls of ``work`` after a warm-up call."""
    times = []
    for _ in range(repeats + 1):
        _sync(device)
        start = time.perf_counter()
        work()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def _head_work(head, hidden, labels, chunks: int | None):
    """The learner's task term of ``hidden`` ``[B, T, D]`` and its backward: whole logits (``chunks``
    None), or by chunks of ``chunks`` logits."""
    from nmperm_plugin.arch.base import next_token_cross_entropy
    from nmperm_plugin.arch.head import TokenHead

    def work():
        leaf = hidden.detach().requires_grad_()
        if chunks is None:
            next_token_cross_entropy(head(leaf), labels).backward()
        else:
            TokenHead(head, VOCAB, chunks).cross_entropy(leaf, labels).backward()

    return work


def _chunks(job: dict) -> int | None:
    return job["logits_per_chunk"] if job["chunked"] else None


def head_worker(job: dict) -> dict:
    """The head alone: a final RMS norm and the vocabulary projection of random weights."""
    import torch
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    device = torch.device(job["device"])
    torch.manual_seed(0)
    hidden_size = HEAD_SHAPES[job["shape"]]
    with torch.device(device):
        norm, projection = LlamaRMSNorm(hidden_size), torch.nn.Linear(hidden_size, VOCAB, bias=False)
        hidden = torch.randn(1, job["positions"], hidden_size)
        labels = torch.randint(0, VOCAB, (1, job["positions"]))
    for parameter in [*norm.parameters(), *projection.parameters()]:
        parameter.requires_grad_(False)

    def head(states):
        return projection(norm(states))

    before = _rss_bytes() if device.type == "cpu" else torch.cuda.memory_allocated()
    _reset_peak(device)
    seconds = _timed(_head_work(head, hidden, labels, _chunks(job)), job["steps"], device)
    return job | {"seconds": seconds, "added_bytes": _peak_bytes(device) - before}


def step_worker(job: dict) -> dict:
    """One end_to_end step of the 1B shape with ``layers`` decoder layers, then its head alone."""
    import torch

    from nmperm_plugin import PermuteConfig
    from nmperm_plugin.arch.head import TokenHead
    from nmperm_plugin.learn.layers import capture_layer_inputs
    from nmperm_plugin.learn.pipeline import make_run
    from nmperm_plugin.learn.window import layer_stack, window_learning

    device = torch.device(job["device"])
    model = random_llama("llama-3.2-1b", device=device, num_hidden_layers=job["layers"])
    ids = torch.randint(0, VOCAB, (job["sequences"], job["seq_len"]), device=device)
    permute = PermuteConfig(init="identity", sequences_per_step=job["sequences"], select_sequences=job["sequences"])
    run = make_run(model, ids, permute)
    hidden, kwargs = capture_layer_inputs(model, run.layers, run.input_ids)
    scores = {n: lin.weight.abs().float() for n, lin in run.linears.items()}  # a step's cost does not depend on them
    _, dense = run.dense_pass(hidden, kwargs, [], keep_outputs=True, on=torch.device("cpu"))
    for site in run.sites:
        run.solve(site, scores)
    stack = layer_stack(run, kwargs)
    assert stack.token_head is not None, "the Llama adapter gives no chunked head"
    chunked = TokenHead(stack.head, VOCAB, job["logits_per_chunk"]) if job["chunked"] else None
    stack = dataclasses.replace(stack, token_head=chunked)
    effective, objective = window_learning(
        run, stack, range(len(run.layers)), hidden, dense, scores, None, False
    )  # the learner's own setup, float32 as on a CPU without AMX
    optimizer = torch.optim.Adam(effective.permuters.parameters(), lr=permute.lr)
    process_peak = _peak_bytes(device)  # the setup's
    before = _rss_bytes() if device.type == "cpu" else torch.cuda.memory_allocated()
    _reset_peak(device)
    counter = iter(range(10**6))

    def step():
        loss = objective.loss(effective.soft(0.5), next(counter))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step_seconds = _timed(step, job["steps"], device)
    peak = _peak_bytes(device)  # the steps'
    head = stack.head  # the run's head (final norm, tied projection) on the step's positions, alone
    last = torch.randn(job["sequences"], job["seq_len"], model.config.hidden_size, device=device)
    head_seconds = _timed(_head_work(head, last, ids, _chunks(job)), job["steps"], device)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    non_head = (step_seconds - head_seconds) * LLAMA_SHAPES["llama-3.2-1b"]["num_hidden_layers"] / job["layers"]
    return job | {
        "step_seconds": step_seconds,
        "head_seconds": head_seconds,
        "head_share": head_seconds / step_seconds,
        "head_share_16_layers_extrapolated": head_seconds / (head_seconds + non_head),
        "peak_bytes": peak,
        "step_added_bytes": peak - before,
        "setup_peak_bytes": process_peak,
        "weight_bytes": weights,
    }


def _gib(value: float) -> str:
    return f"{value / 2**30:.2f}"


def _mode(row: dict) -> str:
    if not row["chunked"]:
        return "whole logits"
    chunk = row.get("logits_per_chunk", 2**26)  # rows from before the option: the package's 2**26 then
    return f"chunks of {chunk // VOCAB} positions"


def markdown(rows: list[dict]) -> str:
    steps = [r for r in rows if r["kind"] == "step" and "error" not in r]
    heads = [r for r in rows if r["kind"] == "head" and "error" not in r]
    lines = []
    if steps:
        setup = steps[0]
        lines += [
            f"One end_to_end learning step of a random-weight Llama-3.2-1B shape with {setup['layers']} of its 16 "
            f"decoder layers (vocabulary {VOCAB}, tied head), {setup['sequences']} x {setup['seq_len']} tokens, "
            "float32, no layer checkpointing, then its head alone on the same positions; the 16-layer share is "
            "extrapolated (everything but the head scales with the layers).",
            "",
            "Memory: the peak RSS of the timed steps (reset after the setup), and what the steps add to the RSS "
            "before them (weights, inputs and dense targets excluded).",
            "",
            "| head | step (s) | head alone (s) | head share | head share, 16 layers (extrapolated) "
            "| step peak RSS (GiB) | step adds (GiB) | weights (GiB) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in steps:
            lines.append(
                f"| {_mode(r)} | {r['step_seconds']:.2f} | {r['head_seconds']:.2f} | {r['head_share']:.1%} "
                f"| {r['head_share_16_layers_extrapolated']:.1%} | {_gib(r['peak_bytes'])} "
                f"| {_gib(r['step_added_bytes'])} | {_gib(r['weight_bytes'])} |"
            )
        lines.append("")
    if heads:
        lines += [
            f"The head alone (final RMS norm, projection to {VOCAB} tokens, next-token cross-entropy, backward into "
            "the hidden states), float32; memory: the peak RSS of the timed calls over the RSS before them (the "
            "weights and inputs excluded).",
            "",
            "| shape | hidden | positions | head | time (s) | memory added (GiB) |",
            "|---|---|---|---|---|---|",
        ]
        for r in heads:
            lines.append(
                f"| {r['shape']} | {HEAD_SHAPES[r['shape']]} | {r['positions']} | {_mode(r)} | {r['seconds']:.2f} "
                f"| {_gib(r['added_bytes'])} |"
            )
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    started = time.time()
    args = parse_args(argv)
    if args.worker:
        sys.path.insert(0, str(ROOT))
        from nmperm_plugin.arch.head import LOGITS_PER_CHUNK

        job = json.loads(args.worker)
        job["logits_per_chunk"] = job["logits_per_chunk"] or LOGITS_PER_CHUNK  # recorded with the row
        print(json.dumps((step_worker if job["kind"] == "step" else head_worker)(job)))
        return 0
    if args.render:
        result = json.loads(args.render.read_text())
        _, md_path = result_pair(args.render)
        md_path.write_text(header_line(result["provenance"]) + "\n\n" + markdown(result["rows"]))
        print(f"wrote {md_path}")
        return 0
    common = dict(device=args.device, steps=args.steps, logits_per_chunk=args.logits_per_chunk)
    modes = [mode == "chunked" for mode in args.modes]
    jobs = [
        dict(common, kind="step", chunked=chunked, layers=args.layers, sequences=args.sequences, seq_len=args.seq_len)
        for chunked in modes
        if "step" in args.kinds
    ]
    jobs += [
        dict(common, kind="head", shape=shape, positions=positions, chunked=chunked)
        for shape in args.head_shapes
        for positions in args.positions
        for chunked in modes
        if "head" in args.kinds
    ]
    rows = []
    for job in jobs:
        rows.append(run_worker(__file__, job, WORKER_TIMEOUT_S, cwd=ROOT, record_errors=True))
        print(json.dumps(rows[-1]), flush=True)
    result = {"machine": {"platform": platform.platform(), "device": args.device}, "vocab": VOCAB, "rows": rows}
    path = args.output or RESULTS / f"head-cost-{args.device}.json"
    path, _ = write_pair(
        path, result, markdown(rows), seeds=[0], started=started, train_dtype="float32", device=args.device
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
