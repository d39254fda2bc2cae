"""The benchmark scripts' method tables are valid configurations: a renamed or removed field fails
here, not twenty minutes into a benchmark run."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from nmperm_plugin import PermuteConfig

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("row", list(_bench("zeroshot").ROWS))
def test_zeroshot_rows_are_valid_configs(row):
    fields = _bench("zeroshot").ROWS[row]
    if fields is not None:
        assert PermuteConfig(**fields, pattern="2:4", scorer="sparsegpt", seed=1).method == fields["method"]


def test_quality_suites_are_valid_configs():
    quality = _bench("quality")
    for suite in quality.SUITES.values():
        for name, fields in suite.items():
            if fields is not None:
                assert quality.method_config(fields, "2:4", "wanda", []).pattern == "2:4", name
