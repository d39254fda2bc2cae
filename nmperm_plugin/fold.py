"""Apply hard permutations to a model exactly (fold) or through run-time gathers, and verify it."""

from __future__ import annotations

import torch
from torch import nn

from .arch.base import Site
from .sidecar import Sidecar


class GatherNorm(nn.Module):
    """A norm whose output channels are gathered: ``norm(x)[..., perm]``.

    The RMS (or mean/variance) statistic is order-independent, so this is the fused form of a
    per-layer input permutation for the linears the norm feeds.
    """

    def __init__(self, norm: nn.Module, perm: torch.Tensor) -> None:
        super().__init__()
        self.norm = norm
        self.register_buffer("perm", perm.clone().long())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x).index_select(-1, self.perm)


class GatherLinear(nn.Module):
    """``linear(x[..., perm])`` with the real ``nn.Linear`` as child ``.linear``."""

    def __init__(self, linear: nn.Linear, perm: torch.Tensor) -> None:
        super().__init__()
        self.linear = linear
        self.register_buffer("perm", perm.clone().long())

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.index_select(-1, self.perm))


@torch.no_grad()
def permute_inputs_(linear: nn.Module, perm: torch.Tensor) -> None:
    """Reorder a linear's input columns: ``W <- W[:, perm]``."""
    linear.weight.data = linear.weight.data[:, perm.to(linear.weight.device)].contiguous()


@torch.no_grad()
def permute_outputs_(module: nn.Module, perm: torch.Tensor) -> None:
    """Reorder a linear's output rows (and bias), or a norm's weight: ``W <- W[perm]``."""
    perm = perm.to(module.weight.device)
    module.weight.data = module.weight.data[perm].contiguous()
    if getattr(module, "bias", None) is not None:
        module.bias.data = module.bias.data[perm].contiguous()


@torch.no_grad()
def permute_embedding_(embedding: nn.Embedding, perm: torch.Tensor) -> None:
    """Reorder embedding channels: ``E <- E[:, perm]``."""
    permute_inputs_(embedding, perm)


def tied_head_perm(site: Site, head_perms: torch.Tensor) -> torch.Tensor:
    """Full input permutation of a tied-heads site from one within-head permutation per head group."""
    size = site.head_size
    offsets = torch.arange(len(site.tied_heads)).mul(size)[:, None]  # [heads, 1]
    return (offsets + head_perms[list(site.tied_heads)]).flatten()


def fold_permutations_(model: nn.Module, sites: list[Site], perms: dict[str, torch.Tensor], adapter) -> None:
    """Fold every site's permutation into the weights (``fold: exact``)."""
    for site in sites:
        adapter.fold_exact(model, site, perms[site.name])


def apply_gather(model: nn.Module, sidecar: Sidecar) -> nn.Module:
    """Turn a ``fold: gather`` checkpoint (original channel order) into its N:M serving form, in place.

    Gather sites get :class:`GatherNorm` / :class:`GatherLinear` modules and permuted weight columns;
    afterwards every pruned linear's stored weight is N:M and the model computes the same function.
    """
    from .arch import get_adapter

    adapter = get_adapter(model)
    sites = {site.name: site for site in adapter.sites(model, sidecar.fold)}
    for name in sorted({site for site in sidecar.frames.values() if site is not None}):
        adapter.apply_gather(model, sites[name], torch.tensor(sidecar.permutations[name], dtype=torch.long))
    return model
