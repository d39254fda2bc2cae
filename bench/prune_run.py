"""A whole ``nmperm prune`` run on a random-weight Llama-3.2-1B-shaped model (hidden 2048, 16 layers,
intermediate 8192, 32 / 8 heads, 128,256-token vocabulary, tied embeddings, bfloat16 on disk), or on
``--model``, timed by phase from its own log: load, dense pass, start, learning (and the ranking
inside it), reconstruction, distillation, fold, save, verify; peak RSS and wall time from
``/usr/bin/time -v``.

The run is interrupted (SIGKILL, as a crash or a pre-empted job would be) once its learning state
holds ``--kill-after`` steps, then rerun with the same command: the rerun resumes, and its log shows
what resuming saved (the learning steps it skipped) and what it did again (load, dense pass, start).
Every phase is measured once, in the first run up to the kill and in the resumed run after it.

    python bench/prune_run.py --output bench/results/prune-llama-1b-shaped-cpu2 --steps 8 --kill-after 5

    python bench/prune_run.py --model SmolLM2.gguf --steps 48 --kill-after 0 \
        --extra="--reconstruct --distill-steps 80" --output bench/results/prune-smollm2-best-cpu2

``--steps``: ``--end-to-end-steps`` (the default is 80: about 70 minutes of learning on 2 CPU
cores for the 1B shape, projected from the measured step time); ``--extra``: more ``nmperm prune``
options; every other setting is ``nmperm prune``'s default.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from models import LLAMA_SHAPES, random_llama
from result_files import result_pair, write_pair

ROOT = Path(__file__).resolve().parents[1]
SHAPE = "llama-3.2-1b"  # models.LLAMA_SHAPES
PHASES = {  # log line -> the phase it ends, and the seconds it reports
    "dense_pass_s": re.compile(r"dense pass over \d+ decoder layers in ([\d.]+) s"),
    "start_s": re.compile(r"start of \d+ sites in ([\d.]+) s"),
    "learning_s": re.compile(r"model: \d+ learning steps in ([\d.]+) s"),
    "learning_steps": re.compile(r"model: (\d+) learning steps in"),
    "ranking_s": re.compile(r"learning steps in [\d.]+ s, ([\d.]+) s of it ranking"),
    "reconstruct_s": re.compile(r"masks applied with SparseGPT's reconstruction in ([\d.]+) s"),
    "distill_s": re.compile(r"distillation of the kept weights, \d+ steps in ([\d.]+) s"),
    "fold_s": re.compile(r"folded \(\w+\) and checked in ([\d.]+) s"),
    "save_s": re.compile(r"saved in ([\d.]+) s"),
    "verify_s": re.compile(r"checksums and verification in ([\d.]+) s"),
}
STAMP = re.compile(r"(\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d\.\d+)")  # loguru's, after any tqdm output


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/nmperm-prune-run"))
    parser.add_argument("--model", type=Path, default=None, help="the model to prune (default: the 1B-shaped one)")
    parser.add_argument("--steps", type=int, default=None, help="--end-to-end-steps (default: nmperm's)")
    parser.add_argument("--extra", default="", help='more nmperm prune options, as one string: --extra="--reconstruct"')
    parser.add_argument("--kill-after", type=int, default=5, help="learning steps saved before the kill (0: none)")
    parser.add_argument("--from-logs", action="store_true", help="rebuild the result from --workdir's two logs")
    parser.add_argument(
        "--resume-only", action="store_true", help="the interrupted run's log is there: run the resumed one only"
    )
    return parser.parse_args(argv)


def make_model(directory: Path) -> None:
    """The random-weight model, with SmolLM2's tokenizer (its ids fit the larger vocabulary)."""
    if (directory / "config.json").exists():
        return
    import torch

    from nmperm_plugin.io.models import default_model_path, load_model

    random_llama(SHAPE, dtype=torch.bfloat16).save_pretrained(directory)
    _, tokenizer = load_model(default_model_path())
    tokenizer.save_pretrained(directory)


def run_prune(command: list[str], log: Path, state: Path | None, kill_after: int) -> dict:
    """Run ``command`` under ``/usr/bin/time -v``, its output to ``log``; SIGKILL it once the state in
    ``state`` holds ``kill_after`` steps (None: let it finish)."""
    with log.open("w") as out:
        process = subprocess.Popen(["/usr/bin/time", "-v", *command], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        started, killed = time.monotonic(), False
        while process.poll() is None:
            time.sleep(2)
            if state is not None and saved_steps(state) >= kill_after:
                subprocess.run(["pkill", "-KILL", "-P", str(process.pid)], check=False)  # nmperm, not /usr/bin/time
                killed = True
                process.wait()
    row = parse_log(log.read_text())
    return row | {"wall_s": time.monotonic() - started, "returncode": process.returncode, "killed": killed}


def parse_log(text: str) -> dict:
    """The phases a run's log reports, its peak RSS and wall time (``/usr/bin/time -v``)."""
    row: dict = {}
    if rss := re.search(r"Maximum resident set size \(kbytes\): (\d+)", text):
        row["peak_rss_gib"] = int(rss.group(1)) / 2**20
    if wall := re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text):
        row["wall_s"] = sum(float(x) * 60**i for i, x in enumerate(reversed(wall.group(1).split(":"))))
    row["killed"] = "terminated by signal 9" in text
    for name, pattern in PHASES.items():
        if found := pattern.search(text):
            row[name] = float(found.group(1)) if name != "learning_steps" else int(found.group(1))
    stamps = [m.group(1) for line in text.splitlines() if (m := STAMP.search(line))]
    load = [line for line in text.splitlines() if "loading model" in line or "learned permutations" in line]
    if len(load) >= 2:  # from the loading line to the run's first line: loading and the calibration text
        row["load_s"] = seconds_between(STAMP.search(load[0]).group(1), STAMP.search(load[1]).group(1))
    row["log_lines"] = [line[-300:] for line in text.splitlines() if "nmperm" in line and "|" in line][-40:]
    row["first_stamp"], row["last_stamp"] = (stamps[0], stamps[-1]) if stamps else (None, None)
    return row


def saved_steps(state: Path) -> int:
    """Learning steps the state's ``current.pt`` holds (0 without one)."""
    current = state / "current.pt"
    if not current.exists():
        return 0
    import torch

    try:
        return int(torch.load(current, weights_only=True).get("step", 0))
    except Exception:  # being written: the rename makes this rare; try again next poll
        return 0


def seconds_between(a: str, b: str) -> float:
    from datetime import datetime

    return (datetime.fromisoformat(b) - datetime.fromisoformat(a)).total_seconds()


def markdown(result: dict) -> str:
    keys = ("wall_s", "peak_rss_gib", "load_s", "dense_pass_s", "start_s", "learning_s", "ranking_s")
    keys += ("reconstruct_s", "distill_s", "fold_s")
    keys += ("save_s", "verify_s")
    lines = ["| run | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name in ("interrupted", "resumed"):
        if row := result.get(name):
            cells = [f"{row[k]:.1f}" if isinstance(row.get(k), float) else str(row.get(k, "")) for k in keys]
            label = name if result.get("interrupted") else "run (not interrupted)"
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", *(f"- {k}: {f'{v:.1f}' if isinstance(v, float) else v}" for k, v in result["summary"].items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
    model_dir, output = args.model or args.workdir / "llama-3.2-1b-shaped", args.workdir / "pruned"
    state = output.parent / (output.name + ".nmperm-state")
    if not args.from_logs and not args.resume_only:
        args.workdir.mkdir(parents=True, exist_ok=True)
        if args.model is None:
            make_model(model_dir)
        shutil.rmtree(output, ignore_errors=True)  # our own scratch folder under --workdir
        shutil.rmtree(state, ignore_errors=True)
    command = [sys.executable, "-m", "nmperm_plugin.cli", "prune", str(model_dir)]
    command += ["--dataset", "builtin:wiki-calibration", "--output", str(output)]
    if args.steps is not None:
        command += ["--end-to-end-steps", str(args.steps)]
    command += shlex.split(args.extra)
    model = str(args.model) if args.model else {"shape": SHAPE} | LLAMA_SHAPES[SHAPE]
    result: dict = {"model": model, "command": command, "kill_after": args.kill_after}
    logs = args.workdir / "interrupted.log", args.workdir / "resumed.log"
    if args.from_logs:  # the same result, parsed again from the runs' logs (wall time: /usr/bin/time's)
        if args.kill_after:
            result["interrupted"] = parse_log(logs[0].read_text())
        result["resumed"] = parse_log(logs[1].read_text())
        result["resumed"]["returncode"] = 0 if "Exit status: 0" in logs[1].read_text() else 1
        result["from_logs"] = [str(log) for log in logs]
    else:
        if args.resume_only:
            result["interrupted"] = parse_log(logs[0].read_text())
        elif args.kill_after:
            result["interrupted"] = run_prune(command, logs[0], state, args.kill_after)
        result["resumed"] = run_prune(command, logs[1], None, 0)
    resumed, first = result["resumed"], result.get("interrupted", {})
    done = resumed.get("learning_steps")
    # a step's own time: the learner's time less its rankings of hard permutations, over its steps
    per_step = (resumed["learning_s"] - resumed.get("ranking_s", 0.0)) / done if done else None
    result["summary"] = {
        "finished": resumed["returncode"] == 0,
        "step_s_without_ranking": per_step,
        "steps_at_80_without_ranking_s": per_step * 80 if per_step else None,
    }
    if first:  # what resuming saved and what it did again
        skipped = (args.steps or 80) - done if done else None
        redone = sum(resumed.get(k, 0.0) for k in ("load_s", "dense_pass_s", "start_s"))
        result["summary"] |= {
            "resume_skipped_steps": skipped,
            "resume_skipped_step_s": per_step * skipped if per_step else None,
            "resume_redid_load_dense_start_s": redone,
            "interrupted_wall_s": first.get("wall_s"),
        }
    # rebuilt from the logs: the stamp of the run's own result file, where there is one, is kept
    previous = result_pair(args.output)[0]
    inputs = [previous] if args.from_logs and previous.exists() else None
    write_pair(args.output, result, markdown(result), seeds=[0], started=started, inputs=inputs)
    print(markdown(result))
    return 0 if resumed["returncode"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
