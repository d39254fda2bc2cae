"""The default objective, ``auto`` (issue 15, item 5): ``end_to_end`` where it fits, else the widest
window that fits, chosen by trying; the log says which ran and why."""

import copy

import pytest
import torch
from conftest import tiny_config, tiny_model
from loguru import logger
from transformers import AutoModelForCausalLM

from nmperm_plugin import PermuteConfig, permute_
from nmperm_plugin.learn.losses import WindowObjective
from nmperm_plugin.learn.objectives import Auto

FAST = dict(block_size=16, sequences_per_step=2, select_sequences=2, end_to_end_steps=3, select_every=1)


def _perms(model, input_ids, **fields):
    sidecar, result = permute_(copy.deepcopy(model), input_ids, PermuteConfig(**FAST, **fields))
    assert sidecar.method == f"learned/{result.objective}" and result.objective in ("end_to_end", "window")
    return {site: perm.tolist() for site, perm in result.perms.items()}


@pytest.fixture
def log():
    lines: list[str] = []
    handle = logger.add(lambda message: lines.append(str(message)), level="INFO")
    yield lines
    logger.remove(handle)


def _out_of_memory_beyond(monkeypatch, widest: int) -> list[int]:
    """Make every window objective wider than ``widest`` layers raise CUDA's out-of-memory error at
    its first step, as a device too small for it would; return the widths tried."""
    tried, loss = [], WindowObjective.loss

    def limited(self, weights, step):
        if step == 0:
            tried.append(len(self.window))
        if len(self.window) > widest:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return loss(self, weights, step)

    monkeypatch.setattr(WindowObjective, "loss", limited)
    return tried


def test_auto_is_the_default_and_runs_end_to_end_where_it_fits(input_ids, log):
    model = tiny_model("llama")  # 2 decoder layers
    assert PermuteConfig().objective == "auto"
    assert _perms(model, input_ids) == _perms(model, input_ids, objective="end_to_end")
    _, result = permute_(copy.deepcopy(model), input_ids, PermuteConfig(**FAST))
    assert result.objective == "end_to_end"  # what auto chose, as the sidecar records it
    ran = [line for line in log if "objective auto ran" in line]
    assert len(ran) == 2 and all("ran end_to_end" in line for line in ran)  # once per auto run


def test_out_of_memory_falls_back_to_the_widest_window_that_fits(input_ids, log, monkeypatch):
    model = _four_layer_model()
    expected = _perms(model, input_ids, objective="window", window_layers=2)
    tried = _out_of_memory_beyond(monkeypatch, widest=2)
    assert _perms(model, input_ids) == expected  # the fallback starts from the same heuristic start
    assert tried == [4, 2, 2]  # end_to_end (4 layers), then windows of 2 (two of them)
    warning = next(line for line in log if "trying window of 2 decoder layers" in line)
    assert "end_to_end ran out of memory" in warning and "Tried to allocate 2.00 GiB" in warning
    ran = next(line for line in log if "objective auto ran" in line)
    assert "ran window of 2 decoder layers" in ran and "(after: end_to_end ran out of memory on cpu" in ran


def test_when_not_even_one_layer_fits_the_error_says_what_to_change(input_ids, monkeypatch):
    model = _four_layer_model()
    tried = _out_of_memory_beyond(monkeypatch, widest=0)
    with pytest.raises(MemoryError, match="not even a window of one decoder layer fits on cpu.*--sequences-per-step"):
        permute_(model, input_ids, PermuteConfig(**FAST))
    assert tried == [4, 2, 1]


def test_attempts_halve_the_window_down_to_one_layer():
    assert [getattr(s, "layers", None) or s.name for s in Auto().attempts(30)] == ["end_to_end", 15, 8, 4, 2, 1]
    assert [s.name for s in Auto().attempts(1)] == ["end_to_end"]


def _four_layer_model():
    config = tiny_config("llama")
    config.num_hidden_layers = 4
    torch.manual_seed(1)
    return AutoModelForCausalLM.from_config(config).eval()
