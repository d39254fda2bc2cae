"""The permutation pipeline: resolve the configuration's plugins, run the objective, fold.

``permute_and_prune_(model, calibration, PermuteConfig(...))`` (token ids ``[N, T]`` or batches of
model inputs, :mod:`nmperm_plugin.data.calibration`) finds a permutation for every site of
``model`` with the configured objective (or heuristic method) and, with ``apply_mask``, applies the
N:M masks; :func:`fold_` then folds what the adapter can fold exactly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from loguru import logger
from torch import nn

from ..arch import Site
from ..config import PermuteConfig
from ..data.calibration import CalibrationData
from ..io.checks import check_finite_parameters, check_pattern_fits
from ..plugins.registry import check_names, get_adapter, get_mask_generator, get_objective, get_solver
from .objectives import HEURISTIC, ObjectiveStrategy
from .run import Run


@dataclass
class PruneResult:
    """Permutations (site name -> permutation of its input channels) and what was measured."""

    sites: list[Site]
    perms: dict[str, torch.Tensor]
    pruned: list[str]
    retained: dict[str, float] = field(default_factory=dict)  # per layer index
    history: dict[str, list[dict]] = field(default_factory=dict)
    seconds: float = 0.0
    objective: str | None = None  # what a learned run optimised (``auto``: the objective it chose)


def strategy_of(config: PermuteConfig) -> ObjectiveStrategy:
    """The configured objective for ``method="learned"``; the heuristic walk for any other method."""
    return get_objective(config.objective) if config.method == "learned" else HEURISTIC


def make_run(
    model: nn.Module, calibration: CalibrationData, config: PermuteConfig, device: torch.device | None = None
) -> Run:
    """A :class:`Run` of ``config`` over ``model`` computing on ``device`` (None: where the weights
    are), with its inputs checked before any work."""
    solver = get_solver(config.init if config.method == "learned" else config.method)
    run = Run(model, calibration, config, get_adapter(model), get_mask_generator(config.scorer), solver, device)
    check_pattern_fits(run.pattern, run.linears, run.sites if config.method != "identity" else ())
    check_finite_parameters(model)
    return run


def permute_and_prune_(
    model: nn.Module, calibration: CalibrationData, config: PermuteConfig, device: torch.device | None = None
) -> PruneResult:
    """Find permutations for every site of ``model`` and (with ``apply_mask``) apply the N:M masks.

    The model stays in its original channel order; call :func:`fold_` to fold the permutations.
    ``device``: where to compute, if not where the weights are (then each decoder layer is copied
    there when it runs, :mod:`nmperm_plugin.runtime.onload`).
    """
    check_names(config)  # the configuration is plain data: its plugin names are checked as the run starts
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    strategy = strategy_of(config)
    with get_adapter(model).linear_form(model):  # every site's weight an nn.Linear for the run
        run = make_run(model, calibration, config, device)
        how = strategy.describe(config) if config.method == "learned" else "heuristic"
        logger.info(
            f"nmperm: {config.method} permutations ({how}), scorer {config.scorer}, pattern {config.pattern}, "
            f"fold {config.fold}, {len(run.samples)} sequences"
        )
        start = time.monotonic()
        hidden, kwargs = run.layer_inputs()
        strategy.solve(run, hidden, kwargs, apply_masks=config.apply_mask)
    seconds, objective = time.monotonic() - start, run.objective if config.method == "learned" else None
    return PruneResult(run.sites, run.perms, run.pruned, run.retained, run.history, seconds, objective)
