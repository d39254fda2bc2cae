"""What hardening costs per learning step: the Hungarian solves (``sinkhorn.hungarian``, SciPy's
``linear_sum_assignment`` on the CPU, one per block) of every learnable block of a model, at the
block counts of SmolLM2-135M, Llama-3.2-1B and LLaMA-2-7B (fold exact, block 64: one ``mlp_out``
and one ``attn_out`` site per layer, ``C_in / 64`` blocks each). A step hardens every block once
(straight-through forward) and a selection pass once more; this is the CPU time a GPU step waits
for. Medians of 5 runs, one thread.

    python bench/hardening.py --output bench/results/hardening-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

# (name, decoder layers, intermediate size, hidden size): blocks = layers * (intermediate + hidden) / 64
SHAPES = (("smollm2-135m", 30, 1536, 576), ("llama-3.2-1b", 16, 8192, 2048), ("llama-2-7b", 32, 11008, 4096))
BLOCK = 64


def time_hardening(blocks: int, repeats: int = 5) -> float:
    """Median seconds of ``hungarian`` on ``blocks`` doubly stochastic 64 x 64 matrices."""
    from nmperm_plugin.sinkhorn import hungarian, log_sinkhorn

    soft = log_sinkhorn(torch.randn(blocks, BLOCK, BLOCK, generator=torch.Generator().manual_seed(0)), 5).exp()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        hungarian(soft)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("bench/results/hardening-cpu.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for name, layers, intermediate, hidden in SHAPES:
        blocks = layers * (intermediate + hidden) // BLOCK
        seconds = time_hardening(blocks)
        rows.append({"shape": name, "blocks": blocks, "seconds": seconds, "ms_per_block": 1000 * seconds / blocks})
    lines = ["| shape | blocks of 64 | Hungarian, all blocks (s) | per block (ms) |", "|---|---|---|---|"]
    lines += [f"| {r['shape']} | {r['blocks']} | {r['seconds']:.3f} | {r['ms_per_block']:.3f} |" for r in rows]
    host = {"machine": platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__}
    args.output.write_text(json.dumps({"host": host, "rows": rows}, indent=1))
    args.output.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
