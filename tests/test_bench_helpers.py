"""The benchmarks' shared helpers: bench/workers.run_worker (a job's result comes back from its own
process; a failed job is raised, or kept as an error row when the bench asks for that) and
bench/models.random_llama (the same seeded model for a shape in every bench)."""

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


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _workers():
    return _bench("workers")


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


def test_random_llama_is_the_same_model_for_a_shape_and_seed():
    import torch

    models = _bench("models")
    tiny = dict(hidden_size=32, num_hidden_layers=2, intermediate_size=64, num_attention_heads=4)
    tiny |= dict(num_key_value_heads=2, vocab_size=128, tie_word_embeddings=True)
    a = models.random_llama(tiny, dtype=torch.bfloat16)
    torch.randn(10)  # the global generator moves on; the builder reseeds
    b = models.random_llama(tiny, dtype=torch.bfloat16)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert a.dtype == torch.bfloat16 and not a.training and not any(p.requires_grad for p in a.parameters())
    c = models.random_llama(tiny, seed=1, num_hidden_layers=1)
    assert c.config.num_hidden_layers == 1 and c.config.max_position_embeddings == 4096
    assert not torch.equal(c.model.embed_tokens.weight, a.model.embed_tokens.weight.float())
    for name in models.LLAMA_SHAPES:  # each named shape is a valid Llama
        config = models.llama_config(name)
        assert config.hidden_size % config.num_attention_heads == 0, name
        assert config.num_attention_heads % config.num_key_value_heads == 0, name
