"""One job of a benchmark in a fresh Python process: ``python SCRIPT --worker JOB_JSON``, whose last
line of standard output is the job's result as JSON. A fresh process per job keeps each one's peak
memory, thread pool and allocator state its own."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def run_worker(
    script: str | Path, job: dict, timeout_s: float, *, cwd: Path | None = None, record_errors: bool = False
) -> dict:
    """Run ``job`` in ``script``'s worker mode and return its result. On failure the end of the
    worker's standard error is printed and either kept in the row (``record_errors``: ``job`` plus an
    ``error`` field, so that one failed shape does not lose the others) or raised as a RuntimeError."""
    done = subprocess.run(
        [sys.executable, str(script), "--worker", json.dumps(job)],
        capture_output=True,
        text=True,
        check=False,
        cwd=cwd,
        timeout=timeout_s,
    )
    if done.returncode:
        print(done.stderr[-3000:], file=sys.stderr)
        last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit status {done.returncode}"
        if record_errors:
            return job | {"error": last}
        raise RuntimeError(f"worker {json.dumps(job)} failed: {last}")
    return json.loads(done.stdout.strip().splitlines()[-1])
