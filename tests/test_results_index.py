"""bench/results/ reproduces: every file is in its index, every file the index or docs/results.md
cites exists, docs/results.md is what bench/report.py computes from the files, and every result file
a bench script writes carries its provenance stamp (bench/result_files.write_pair)."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
INDEX = RESULTS / "README.md"
REPORT = ROOT / "docs" / "results.md"
RESULT_FILE = re.compile(r"`([\w./-]+\.(?:json|md|txt|png))`")


def _bench(name: str):
    sys.path.insert(0, str(BENCH))  # the scripts import each other by name (metrics, result_files)
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _result_files() -> set[str]:
    return {str(p.relative_to(RESULTS)) for p in RESULTS.rglob("*") if p.is_file() and p != INDEX}


def _index_names() -> set[str]:
    """Result files the index names (backticked paths relative to bench/results/; commands and
    other paths, e.g. recipes/*.yaml or bench/..., are not result files)."""
    names = set(RESULT_FILE.findall(INDEX.read_text()))
    return {n for n in names if not n.startswith(("bench/", "recipes/", "docs/", "tests/", "/"))}


def test_every_result_file_is_in_the_index():
    missing = sorted(_result_files() - _index_names())
    assert not missing, f"bench/results/README.md does not list {missing}"


def test_every_file_the_index_names_exists():
    absent = sorted(n for n in _index_names() if not (RESULTS / n).is_file())
    assert not absent, f"bench/results/README.md names files that are not there: {absent}"


def test_every_file_docs_results_cites_exists():
    cited = _bench("report").cited_files(REPORT.read_text())
    assert cited, "docs/results.md cites no result file"
    absent = sorted(name for name in cited if not (RESULTS / name).is_file())
    assert not absent, f"docs/results.md links result files that are not there: {absent}"


def test_every_file_off_docs_results_is_named_where_the_index_says():
    """The index says where the files the page does not table are: its "Not on docs/results.md"
    section names each (a .md beside a cited .json counts as cited)."""
    cited = {str(Path(n).with_suffix("")) for n in _bench("report").cited_files(REPORT.read_text())}
    section = INDEX.read_text().partition("\n## Not on docs/results.md")[2].partition("\n## ")[0]
    off_page = sorted(n for n in _result_files() if str(Path(n).with_suffix("")) not in cited)
    unnamed = [n for n in off_page if f"`{n}`" not in section]
    assert not unnamed, f"docs/results.md does not cite {unnamed} and the index's 'Not on' section misses them"


def test_docs_results_stays_a_compact_page():
    """One results page of current tables (issue 31: docs/ under 100,000 characters in all)."""
    assert len(REPORT.read_text()) < 16_000, "docs/results.md is over 16,000 characters: move detail to the files"


def test_docs_results_is_what_the_files_give():
    text, _ = _bench("report").report()
    assert REPORT.read_text() == text, "docs/results.md is stale: run python bench/report.py"


def test_gap_closed_is_taken_on_the_medians():
    metrics = _bench("metrics")
    base, learned, bound = [210.0, 222.0, 203.0], [112.0, 114.0, 130.0], [60.4, 60.1, 60.5]
    expected = metrics.gap_closed(210.0, 114.0, 60.4)
    assert metrics.gap_closed_of_medians(base, learned, bound) == pytest.approx(expected)
    shares = metrics.gap_closed_per_seed(dict(enumerate(base)), dict(enumerate(learned)), dict(enumerate(bound)))
    assert sorted(shares) == [0, 1, 2] and shares[0] == pytest.approx(metrics.gap_closed(210.0, 112.0, 60.4))
    assert metrics.penalty(21.3 * 2, 21.3) == pytest.approx(0.6931, abs=1e-4)
    assert metrics.penalty_fraction(40.0, 80.0, 20.0) == pytest.approx(0.5)


def test_the_headline_recipe_figure_is_computed_from_its_file():
    _, headline = _bench("report").report()
    runs = json.loads((RESULTS / "recipes-wanda-2of4-e2e-epochs-fp32-amd-5seeds.json").read_text())["summary"]
    metrics = _bench("metrics")
    expected = metrics.gap_closed_of_medians(
        runs["wanda"]["perplexities"], runs["wanda+learned"]["perplexities"], runs["wanda-unstructured"]["perplexities"]
    )
    assert headline["recipe_5seeds"] == pytest.approx(expected)


FIELDS = ("command", "git", "cpu", "gpu", "train_dtype", "versions", "seeds", "wall_seconds", "date")


def test_write_pair_stamps_provenance(tmp_path):
    result_files = _bench("result_files")
    started = time.time() - 2.0
    json_path, md_path = result_files.write_pair(
        tmp_path / "run", {"rows": [1]}, "| a |\n", seeds=[2, 0], started=started
    )
    stamp = json.loads(json_path.read_text())["provenance"]
    assert set(FIELDS) <= set(stamp)
    assert stamp["command"].split()[0].endswith(Path(sys.executable).name)
    assert re.fullmatch(r"[0-9a-f]{40}", stamp["git"]["commit"]) and isinstance(stamp["git"]["dirty"], bool)
    assert stamp["cpu"]["model"] and set(stamp["cpu"]["flags"]) <= set(result_files.SPEED_FLAGS)
    assert stamp["train_dtype"]["requested"] == "auto" and stamp["train_dtype"]["resolved"] in ("float32", "bfloat16")
    assert set(result_files.PACKAGES) <= set(stamp["versions"]) and stamp["versions"]["torch"]
    assert stamp["seeds"] == [0, 2] and stamp["wall_seconds"] >= 2.0
    header = md_path.read_text().splitlines()[0]
    assert stamp["command"] in header and stamp["git"]["commit"][:10] in header and stamp["cpu"]["model"] in header
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json", "run.md"]  # no partial file left


def test_write_pair_never_leaves_half_a_file(tmp_path, monkeypatch):
    result_files = _bench("result_files")
    json_path, md_path = result_files.write_pair(tmp_path / "run", {"rows": [1]}, "| a |\n", seeds=[0], started=0.0)
    before = json_path.read_text()

    write_text = Path.write_text

    def killed(self, text, *args, **kwargs):  # the process dies halfway through a write
        write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", killed)
    with pytest.raises(KeyboardInterrupt):
        result_files.write_pair(tmp_path / "run", {"rows": [2]}, "| b |\n", seeds=[0], started=0.0)
    monkeypatch.undo()
    assert json_path.read_text() == before  # the previous result, whole


def test_train_dtype_is_resolved_by_the_library_rule():
    import torch

    from nmperm_plugin.learn.losses import training_dtype

    result_files = _bench("result_files")
    for requested in ("auto", "float32", "bfloat16"):
        resolved = result_files.resolved_train_dtype(requested, "cpu")["resolved"]
        assert resolved == str(training_dtype(requested, torch.device("cpu")) or torch.float32).removeprefix("torch.")


def test_a_merged_file_keeps_every_input_stamp(tmp_path):
    result_files = _bench("result_files")
    first, _ = result_files.write_pair(tmp_path / "s0", {"seed": 0}, "", seeds=[0], started=time.time())
    second, _ = result_files.write_pair(tmp_path / "s1", {"seed": 1}, "", seeds=[1], started=time.time())
    merged, _ = result_files.write_pair(
        tmp_path / "all", {}, "", seeds=[0, 1], started=time.time(), train_dtype=None, inputs=[first, second]
    )
    stamp = json.loads(merged.read_text())["provenance"]
    assert stamp["train_dtype"] is None  # as a merge passes it (bench/recipes.py, quality.py): no learning here
    inputs = stamp["inputs"]
    assert [Path(i["file"]).name for i in inputs] == ["s0.json", "s1.json"]
    assert [i["provenance"]["seeds"] for i in inputs] == [[0], [1]]


def test_recipes_merge_reports_the_gap_on_the_medians(tmp_path):
    """bench/recipes.py --from-json: the headline is the medians' share, the per-seed shares extra."""
    pytest.importorskip("yaml")
    recipes = _bench("recipes")
    metrics = _bench("metrics")
    files = []
    variants = ("wanda", "wanda-unstructured", "wanda+learned", "sparsegpt", "learned+reconstruct")
    table = {
        0: (210.0, 60.4, 112.0, 100.0, 70.0),
        1: (222.0, 60.1, 118.0, 110.0, 75.0),
        2: (203.0, 60.5, 130.0, 90.0, 95.0),
    }
    for seed, values in table.items():
        run = {
            "seed": seed,
            "calibration": f"x (seed {seed})",
            "overrides": {},
            "dense_perplexity": 26.5,
            "variants": [{"variant": v, "perplexity": p} for v, p in zip(variants, values, strict=True)],
        }
        path, _ = _bench("result_files").write_pair(tmp_path / f"s{seed}", run, "", seeds=[seed], started=time.time())
        files.append(path)
    assert recipes.merge(files, tmp_path / "merged") == 0
    merged = json.loads((tmp_path / "merged.json").read_text())
    learned = merged["summary"]["wanda+learned"]
    assert learned["gap_closed"] == pytest.approx(metrics.gap_closed(210.0, 118.0, 60.4))
    assert len(learned["gap_closed_per_seed"]) == 3
    best = merged["summary"]["learned+reconstruct"]  # penalty over dense as a share of SparseGPT 2:4's
    assert best["penalty_fraction"] == pytest.approx(metrics.penalty_fraction(75.0, 100.0, 26.5))
    assert best["penalty_fraction_per_seed"]["2"] == pytest.approx(metrics.penalty_fraction(95.0, 90.0, 26.5))
    assert best["beats_reference_every_seed"] is False  # seed 2: 95 against SparseGPT's 90
    assert merged["summary"]["sparsegpt"]["penalty_fraction"] == pytest.approx(1.0)
    assert [i["provenance"]["seeds"] for i in merged["provenance"]["inputs"]] == [[0], [1], [2]]
    assert merged["provenance"]["train_dtype"] is None
