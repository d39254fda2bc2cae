"""Objectives as strategies: how a run finds its permutations (what ``objective:`` names).

Built-ins are registered through the ``nmperm_objectives`` hook like a third party's:
``auto`` (the default: ``end_to_end``, else the widest ``window`` that fits the device),
``retained``, ``layerwise``, ``end_to_end``, ``window`` (end_to_end's loss on a moving window of
decoder layers) and ``staged`` (layerwise, then end_to_end from its result). A strategy sets
``run.perms`` for every site and, with ``apply_masks``, prunes the model.

The layer-by-layer objectives are in :mod:`.sequential`, the window and end_to_end ones in
:mod:`.window`; this module holds ``auto``, ``staged`` and the list the built-in plugin registers.
"""

from __future__ import annotations

import gc
from typing import TYPE_CHECKING

import torch
from loguru import logger

from .run import Run
from .sequential import Layerwise, ObjectiveStrategy, Retained, Sequential
from .window import EndToEnd, Window

if TYPE_CHECKING:
    from ..config import PermuteConfig


class Auto(ObjectiveStrategy):
    """The most accurate objective that fits the device: ``end_to_end``, else ``window`` with the
    widest window that fits (half the decoder layers, then a quarter, ... down to one), found by
    trying: an out-of-memory error of the device in one falls back to the next, from the same
    heuristic start. Memory on the CPU is not probed (the host's RAM is checked for the dense targets
    only, and an exhausted host kills the process instead of raising): there it is ``end_to_end``."""

    name = "auto"
    keeps_dense_outputs = True  # every attempt is a Window

    def attempts(self, num_layers: int) -> list[Window]:
        sizes, size = [], num_layers
        while size > 1:
            size = (size + 1) // 2
            sizes.append(size)
        return [EndToEnd(), *(Window(k) for k in sizes)]

    def solve(self, run: Run, hidden: torch.Tensor, kwargs: list[dict], apply_masks: bool) -> None:
        config, failed = run.config, []
        for strategy in self.attempts(len(run.layers)):
            if failed:
                logger.warning(f"nmperm: objective auto: {failed[-1]}; trying {strategy.describe(config)}")
            else:
                logger.info(
                    f"nmperm: objective auto: {strategy.describe(config)} (the most accurate; on {run.device.type}"
                    + (", an out-of-memory error falls back to the window objective)" if run.device.type != "cpu"
                       else ", where memory is not probed: use --objective window if the host runs out)")
                )  # fmt: skip
            try:
                strategy.solve(run, hidden, kwargs, apply_masks)
            except torch.OutOfMemoryError as error:
                failed.append(f"{strategy.name} ran out of memory on {run.device} ({str(error).splitlines()[0]})")
            else:
                run.objective = strategy.name
                note = f" (after: {'; '.join(failed)})" if failed else ""
                logger.info(f"nmperm: objective auto ran {strategy.describe(config)}{note}")
                return
            free_device_memory(run.device)
        raise MemoryError(
            f"objective auto: not even a window of one decoder layer fits on {run.device}: {failed[-1]}; use fewer "
            f"tokens per step (--sequences-per-step 1, a shorter --seq-len), --layer-checkpointing on, or a "
            f"device with more memory"
        )

    def describe(self, config: PermuteConfig) -> str:
        return f"{self.name} (end_to_end, else the widest window that fits), {config.total_steps} steps per window"


def free_device_memory(device: torch.device) -> None:
    """Return what a failed attempt held to the device (its tensors are garbage once its frames are)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Staged(ObjectiveStrategy):
    """One strategy, then another from its permutations (the first prunes nothing)."""

    def __init__(self, name: str, first: ObjectiveStrategy, then: ObjectiveStrategy) -> None:
        self.name, self.first, self.then = name, first, then
        self.keeps_dense_outputs = then.keeps_dense_outputs  # first never prunes: then's dense pass is dense

    def solve(self, run: Run, hidden: torch.Tensor, kwargs: list[dict], apply_masks: bool) -> None:
        self.first.solve(run, hidden, kwargs, apply_masks=False)
        self.then.solve(run, hidden, kwargs, apply_masks)

    def describe(self, config: PermuteConfig) -> str:
        return f"{self.name}: {self.first.describe(config)}, then {self.then.describe(config)}"


HEURISTIC = Sequential()


BUILTIN_OBJECTIVES = (Auto(), Retained(), Layerwise(), EndToEnd(), Window(), Staged("staged", Layerwise(), EndToEnd()))
