"""bench/workers.run_worker: a job's result comes back from its own process; a failed job is raised,
or kept as an error row when the bench asks for that."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPT = """
import json, os, sys
job = json.loads(sys.argv[sys.argv.index("--worker") + 1])
if job["fail"]:
    sys.exit("the worker refused: " + job["name"])
print("noise before the result")
print(json.dumps(job | {"doubled": 2 * job["value"], "pid": os.getpid(), "cwd": os.getcwd()}))
"""


def _workers():
    spec = importlib.util.spec_from_file_location("bench_workers", BENCH / "workers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_job_runs_in_its_own_process_and_returns_its_last_line(tmp_path):
    script = tmp_path / "bench_script.py"
    script.write_text(SCRIPT)
    row = _workers().run_worker(script, {"name": "a", "value": 21, "fail": False}, 60, cwd=tmp_path)
    assert row["doubled"] == 42 and row["name"] == "a"
    assert row["pid"] != os.getpid() and Path(row["cwd"]) == tmp_path


def test_a_failed_job_is_raised_or_kept_as_an_error_row(tmp_path, capsys):
    script = tmp_path / "bench_script.py"
    script.write_text(SCRIPT)
    job = {"name": "b", "value": 1, "fail": True}
    with pytest.raises(RuntimeError, match="the worker refused: b"):
        _workers().run_worker(script, job, 60)
    row = _workers().run_worker(script, job, 60, record_errors=True)
    assert row == job | {"error": "the worker refused: b"}
    assert "the worker refused: b" in capsys.readouterr().err
