"""The permutation pipeline of one model: resolve the configuration's plugins, run the objective,
apply the masks, fold.

``permute_and_prune_(model, calibration, PermuteConfig(...))`` (token ids ``[N, T]`` or batches of
model inputs, :mod:`nmperm_plugin.data.calibration`) finds a permutation for every site of
``model`` with the configured objective (or heuristic solver) and, with ``apply_mask``, applies the
N:M masks; :func:`permute_model_` also folds what the adapter can fold exactly, checks that folding
kept the model's function, and describes the run in a :class:`~nmperm_plugin.io.sidecar.Sidecar`.
The public entry point, :func:`nmperm_plugin.permute_`, adds parts, placement and resume around it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from loguru import logger
from torch import nn

from ..arch import Adapter, Site
from ..config import PermuteConfig
from ..core.ops import function_error, function_tolerance
from ..data.calibration import CalibrationData, samples_of, to_device
from ..io.checks import check_finite_parameters, check_pattern_fits
from ..io.sidecar import Sidecar
from ..plugins.registry import check_names, get_adapter, get_mask_generator, get_objective, get_solver
from ..runtime.sharding import check_setting, sharded
from .distill import check_distillable, dense_targets, distill_
from .fold import fold_
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
    model: nn.Module,
    calibration: CalibrationData,
    config: PermuteConfig,
    device: torch.device | None = None,
    adapter: Adapter | None = None,
) -> Run:
    """A :class:`Run` of ``config`` over ``model`` computing on ``device`` (None: where the weights
    are), with its inputs checked before any work; ``adapter``: the run's (None: the registered one)."""
    solver = get_solver(config.init if config.method == "learned" else config.method)
    adapter = adapter or get_adapter(model)
    run = Run(model, calibration, config, adapter, get_mask_generator(config.scorer), solver, device)
    check_pattern_fits(run.pattern, run.linears, run.sites if config.method != "identity" else ())
    check_finite_parameters(model)
    if config.shard_weights:  # refused here, before the dense pass, where it cannot run
        check_setting(config.select_sequences, run.sequences_per_step, len(run.samples), adapter)
    return run


def permute_and_prune_(
    model: nn.Module,
    calibration: CalibrationData,
    config: PermuteConfig,
    device: torch.device | None = None,
    adapter: Adapter | None = None,
) -> PruneResult:
    """Find permutations for every site of ``model`` and (with ``apply_mask``) apply the N:M masks.

    The model stays in its original channel order; call :func:`fold_` to fold the permutations.
    ``device``: where to compute, if not where the weights are (then each decoder layer is copied
    there when it runs, :mod:`nmperm_plugin.runtime.onload`). ``adapter``: resolved once per run by
    the caller (None: the registered one that handles ``model``). With ``config.shard_weights``, the
    decoder layers' matrices are sharded over the ranks after their inputs are captured and gathered
    back whole at the end (:mod:`nmperm_plugin.runtime.sharding`).
    """
    check_names(config)  # the configuration is plain data: its plugin names are checked as the run starts
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    strategy = strategy_of(config)
    adapter = adapter or get_adapter(model)
    with adapter.linear_form(model):  # every site's weight an nn.Linear for the run
        run = make_run(model, calibration, config, device, adapter)
        how = strategy.describe(config) if config.method == "learned" else "heuristic"
        logger.info(
            f"nmperm: {config.method} permutations ({how}), scorer {config.scorer}, pattern {config.pattern}, "
            f"fold {config.fold}, {len(run.samples)} sequences"
        )
        start = time.monotonic()
        hidden, kwargs = run.layer_inputs()
        targets = None
        if config.distill_steps:
            check_distillable(run)
            if not strategy.keeps_dense_outputs:  # else its dense pass keeps them: Run.distill_targets
                targets = dense_targets(run, hidden, kwargs)
        with sharded(run.layers, config.shard_weights):  # each rank keeps its part; whole again after
            strategy.solve(run, hidden, kwargs, apply_masks=config.apply_mask)
        if config.distill_steps:
            targets = run.distill_targets if targets is None else targets
            run.distill_targets = None  # held by the distillation alone from here
            run.history["distillation"] = distill_(run, hidden, kwargs, targets)
    seconds, objective = time.monotonic() - start, run.objective if config.method == "learned" else None
    return PruneResult(run.sites, run.perms, run.pruned, run.retained, run.history, seconds, objective)


def permute_model_(
    model: nn.Module,
    calibration: CalibrationData,
    config: PermuteConfig,
    device: torch.device | None = None,
    adapter: Adapter | None = None,
) -> tuple[Sidecar, PruneResult]:
    """:func:`permute_and_prune_`, then fold the permutations (:func:`~nmperm_plugin.learn.fold.fold_`)
    and check on the first calibration sample that folding kept the model's outputs within its
    precision's tolerance; returns the run's sidecar and result."""
    adapter = adapter or get_adapter(model)
    samples = samples_of(calibration)
    result = permute_and_prune_(model, samples, config, device, adapter)
    probe = to_device(adapter.model_inputs(samples[0]), next(model.parameters()).device)
    with torch.no_grad():
        before = adapter.outputs(model(**probe))
    started = time.monotonic()
    frames = fold_(model, result, config.fold, adapter)
    with torch.no_grad():
        fold_error = function_error(before, adapter.outputs(model(**probe)))
    logger.info(f"nmperm: folded ({config.fold}) and checked in {time.monotonic() - started:.1f} s")
    if fold_error > function_tolerance(before.dtype):
        raise RuntimeError(
            f"folding changed the model's outputs by {fold_error:.3g} of their scale: this is a bug, please report it"
        )
    sidecar = Sidecar(
        pattern=config.pattern,
        scorer=config.scorer,
        method=config.method if config.method != "learned" else f"learned/{result.objective}",
        fold=config.fold,
        architecture=adapter.name,
        permutations={name: perm.tolist() for name, perm in result.perms.items()},
        frames=frames if config.apply_mask else {},
        masked=config.apply_mask,
        figures={
            "permutation_seconds": round(result.seconds, 1),
            "retained_ratio": sum(result.retained.values()) / max(len(result.retained), 1),
            "retained_ratio_per_layer": result.retained,
            "reconstructed": config.apply_mask and config.reconstruct,
            "distillation_select": _distillation(result.history.get("distillation")),
        },
        verification={"fold_relative_logit_error": fold_error},
    )
    sidecar.dense = dense_linears(model, sidecar, adapter)
    return sidecar, result


def _distillation(curve: list[dict] | None) -> dict | None:
    """The distillation's selection loss before and after (None: no distillation ran)."""
    return None if not curve else {"before": curve[0]["select"], "after": curve[-1]["select"]}


def dense_linears(model: nn.Module, sidecar: Sidecar, adapter: Adapter | None = None) -> list[str]:
    """The linears ``model``'s adapter permutes that ``sidecar`` does not list as pruned (all of them
    without a mask): what it records as left dense on purpose, and ``nmperm verify`` holds it to."""
    adapter = adapter or get_adapter(model)
    linears = {name for site in adapter.serving_sites(model, sidecar.fold) for name in site.linears}
    return sorted(linears - set(sidecar.frames)) if sidecar.masked else sorted(linears)
