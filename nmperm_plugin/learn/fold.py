"""Fold a run's permutations into the model (``fold: exact``) or realise them as run-time gathers
(the serving form of a ``fold: gather`` checkpoint). The adapter decides what folds exactly."""

from __future__ import annotations

import torch
from torch import nn

from ..arch import Adapter, Site
from ..core.ops import GatherLinear, GatherNorm
from ..io.sidecar import Sidecar
from ..plugins.registry import get_adapter

__all__ = ["GatherLinear", "GatherNorm", "apply_gather", "fold_", "fold_permutations_"]


def fold_permutations_(model: nn.Module, sites: list[Site], perms: dict[str, torch.Tensor], adapter: Adapter) -> None:
    """Fold every site's permutation into the weights."""
    with adapter.linear_form(model):
        for site in sites:
            adapter.fold_exact(model, site, perms[site.name])


def fold_(model: nn.Module, result, fold: str, adapter: Adapter | None = None) -> dict[str, str | None]:
    """Fold what the adapter folds exactly in mode ``fold``; return each pruned linear's frame (the
    site it still needs at serving time, or None).
    ``result`` is a :class:`~nmperm_plugin.learn.pipeline.PruneResult`; ``adapter``: the run's (None:
    the registered one that handles ``model``)."""
    adapter = adapter or get_adapter(model)
    foldable = [s for s in result.sites if adapter.folds_exactly(s, fold)]
    fold_permutations_(model, foldable, result.perms, adapter)
    folded = {s.name for s in foldable}
    site_of = {name: site for site in result.sites for name in site.linears}
    return {n: (None if site_of[n].name in folded else site_of[n].name) for n in result.pruned}


def apply_gather(model: nn.Module, sidecar: Sidecar) -> nn.Module:
    """Turn a ``fold: gather`` checkpoint (original channel order) into its N:M serving form, in place.

    Gather sites get :class:`GatherNorm` / :class:`GatherLinear` modules and permuted weight columns;
    afterwards every pruned linear's stored weight is N:M and the model computes the same function.
    """
    adapter = get_adapter(model)
    with adapter.linear_form(model):
        sites = {site.name: site for site in adapter.serving_sites(model, sidecar.fold)}
        for name in sorted({site for site in sidecar.frames.values() if site is not None}):
            adapter.apply_gather(model, sites[name], torch.tensor(sidecar.permutations[name], dtype=torch.long))
    return model
