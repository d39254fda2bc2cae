"""Where a benchmark whose ``--output`` names a pair of result files writes them, the writing, and
the provenance stamp every result file carries.

Every bench script writes through :func:`write_pair`, which adds a ``provenance`` block
(:func:`provenance`) to the JSON and a one-line header (command, commit, CPU) to the markdown, so a
file says how to reproduce it: the command line, the commit and whether the tree was dirty, the CPU
model and the flags that decide its speed (and bfloat16 learning), the GPU, the train dtype learning
resolved to on this host, the package versions, the seeds, the wall time and the date. A file merged
from others (``--from-json``) keeps every input's stamp in ``provenance["inputs"]``.
"""

from __future__ import annotations

import datetime
import json
import shlex
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# /proc/cpuinfo flags that decide how fast learning runs and in which dtype (`train_dtype: auto`)
SPEED_FLAGS = (
    "avx2",
    "fma",
    "f16c",
    "avx_vnni",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)
PACKAGES = ("torch", "transformers", "llmcompressor", "torchao", "nmperm-plugin")
GIT_TIMEOUT_S = 30


def result_pair(output: str | Path) -> tuple[Path, Path]:
    """``output``.json and ``output``.md; ``output`` may end in either. A dot elsewhere in the name
    stays (``vit-average-0.9`` gives ``vit-average-0.9.json``, not ``vit-average-0.json``)."""
    output = Path(output)
    stem = output.with_suffix("") if output.suffix in (".json", ".md") else output
    return stem.parent / f"{stem.name}.json", stem.parent / f"{stem.name}.md"


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=GIT_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def git_state() -> dict:
    """The commit checked out and whether tracked files differ from it (``git status --porcelain``,
    untracked files left out): the files that differ are listed."""
    commit = _git("rev-parse", "HEAD")
    changed = _git("status", "--porcelain", "--untracked-files=no")
    changed = [line[3:] for line in (changed or "").splitlines() if line.strip()]
    return {"commit": commit.strip() if commit else None, "dirty": bool(changed), "changed": changed}


def cpu_info(cpuinfo: str | Path = "/proc/cpuinfo") -> dict:
    """The CPU model, its speed-relevant flags (:data:`SPEED_FLAGS`) and the logical CPUs, from
    ``/proc/cpuinfo``; on a system without it, the model ``platform`` reports and no flags."""
    import os
    import platform

    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return {"model": platform.processor() or platform.machine(), "flags": [], "logical_cpus": os.cpu_count()}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:  # the first processor's entry
            fields[key.strip()] = value.strip()
    flags = set(fields.get("flags", "").split())
    return {
        "model": fields.get("model name") or platform.processor() or platform.machine(),
        "flags": [flag for flag in SPEED_FLAGS if flag in flags],
        "logical_cpus": os.cpu_count(),
    }


def versions() -> dict[str, str | None]:
    """Installed versions of :data:`PACKAGES` (None where not installed), from the package metadata."""
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def resolved_train_dtype(requested: str = "auto", device: str = "cpu") -> dict:
    """The dtype learning passes run in for ``train_dtype`` ``requested`` on ``device`` of this host,
    resolved by the library's own rule (``nmperm_plugin.learn.losses.training_dtype``), not guessed."""
    import torch

    from nmperm_plugin.learn.losses import training_dtype

    autocast = training_dtype(requested, torch.device(device))
    return {"requested": requested, "device": device, "resolved": str(autocast or torch.float32).removeprefix("torch.")}


def gpu_name() -> str | None:
    """The first CUDA device's name, if torch sees one (torch is imported only if a script did)."""
    torch = sys.modules.get("torch")
    if torch is None:
        try:
            import torch
        except ImportError:
            return None
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def provenance(
    *,
    seeds: list[int] | tuple[int, ...] | None,
    started: float,
    train_dtype: str | None = "auto",
    device: str = "cpu",
    inputs: list[Path | str | dict] | None = None,
    argv: list[str] | None = None,
) -> dict:
    """The stamp of a result file: how to run it again and on what it ran.

    ``seeds``: the seeds of the run (None: a run with no seed); ``started``: ``time.time()`` when
    the run began (wall time is measured from it); ``train_dtype``/``device``: the learning dtype the
    run asked for and where it learned (resolved here by the library's rule; None: this command learned
    nothing, e.g. a merge, whose inputs' stamps hold theirs); ``inputs``: result files
    this one was merged from, each kept with its own stamp (None if it has none)."""
    stamp = {
        "command": shlex.join([sys.executable, *(sys.argv if argv is None else argv)]),
        "git": git_state(),
        "cpu": cpu_info(),
        "gpu": gpu_name(),
        "train_dtype": None if train_dtype is None else resolved_train_dtype(train_dtype, device),
        "versions": versions(),
        "seeds": None if seeds is None else sorted(int(seed) for seed in seeds),
        "wall_seconds": round(time.time() - started, 1),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if inputs is not None:
        stamp["inputs"] = [_input_stamp(path if isinstance(path, dict) else Path(path)) for path in inputs]
    return stamp


def _input_stamp(path: Path | dict) -> dict:
    """``{file, provenance}`` of an input file (its stamp read from it; None if it has none), or an
    entry already in that form (a file rewritten in place keeps its earlier stamp that way)."""
    if isinstance(path, dict):
        return {"file": str(path["file"]), "provenance": path.get("provenance")}
    try:
        name = str(path.resolve().relative_to(ROOT))
    except ValueError:
        name = str(path)
    try:
        found = json.loads(path.read_text()).get("provenance")
    except (OSError, ValueError, AttributeError):
        found = None
    return {"file": name, "provenance": found}


def header_line(stamp: dict) -> str:
    """One markdown line: command, commit (``+dirty``) and CPU with its speed flags."""
    git = stamp["git"]
    commit = (git["commit"] or "unknown")[:10] + (" +dirty" if git["dirty"] else "")
    cpu = stamp["cpu"]
    flags = ", ".join(cpu["flags"]) or "no AVX2"
    gpu = f"; GPU {stamp['gpu']}" if stamp.get("gpu") else ""
    dtype = stamp["train_dtype"]
    if dtype is None:
        learning = "no learning (merged)"
    else:
        learning = f"learning in {dtype['resolved']} (train_dtype {dtype['requested']})"
    return (
        f"<sub>`{stamp['command']}` · commit {commit} · {cpu['model']} ({flags}){gpu} · {learning} · "
        f"{stamp['wall_seconds']:.0f} s</sub>"
    )


def write_pair(
    output: str | Path,
    result: dict,
    markdown: str,
    *,
    seeds: list[int] | tuple[int, ...] | None,
    started: float,
    train_dtype: str | None = "auto",
    device: str = "cpu",
    inputs: list[Path | str | dict] | None = None,
) -> tuple[Path, Path]:
    """``result`` with its :func:`provenance` stamp as JSON (indent 1, a final newline) and
    ``markdown`` under a :func:`header_line` at :func:`result_pair` of ``output``, its folder made if
    missing; returns the two paths. The keyword arguments are :func:`provenance`'s."""
    json_path, md_path = result_pair(output)
    stamp = provenance(seeds=seeds, started=started, train_dtype=train_dtype, device=device, inputs=inputs)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    for path, text in (
        (json_path, json.dumps(result | {"provenance": stamp}, indent=1, default=str) + "\n"),
        (md_path, header_line(stamp) + "\n\n" + markdown),
    ):  # whole or not at all: a run killed while writing leaves the previous file, never half of one
        partial = path.with_name(path.name + ".partial")
        partial.write_text(text)
        partial.replace(path)
    return json_path, md_path
