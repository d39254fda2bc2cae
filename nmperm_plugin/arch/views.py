"""Linear views of weights stored otherwise, for an adapter's :meth:`~nmperm_plugin.arch.base.Adapter.linear_form`.

:func:`swapped` replaces modules by stand-ins whose weights are ``nn.Linear`` views of the stored
ones for the duration of a ``with`` block and, on exit, writes every view that no longer shares the
stored memory (a fold gave it new data) back and puts the original module wherever its stand-in is
(a fold may have wrapped it, e.g. in a ``GatherLinear``). In-place changes (masks) reach the stored
weights through the views directly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from .decoder import find

_STAND_IN = "_nmperm_stand_in"  # set on a stand-in: nested linear forms leave it alone


def linear_view(weight: torch.Tensor, bias: nn.Parameter | None = None) -> nn.Linear:
    """An ``nn.Linear`` whose weight is ``weight`` (a view ``[out, in]``, not copied) and whose bias is
    the given parameter itself; nothing requires grad."""
    out_features, in_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=False, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    linear.bias = bias
    return linear


@torch.no_grad()
def write_back(stored: torch.Tensor, view: torch.Tensor) -> None:
    """Copy ``view`` into ``stored`` (same shape) unless it still is that memory."""
    if view.data_ptr() != stored.data_ptr() or view.stride() != stored.stride():
        stored.copy_(view)


def _put_back(model: nn.Module, originals: dict[int, nn.Module]) -> None:
    """Replace every child that is a stand-in (by identity) by its original module."""
    for module in model.modules():
        for name, child in list(module.named_children()):
            if id(child) in originals:
                setattr(module, name, originals[id(child)])


def swap_in(model: nn.Module, paths: list[str], stand_in: Callable[[nn.Module], nn.Module]) -> list[tuple]:
    """Replace the module at each of ``paths`` by ``stand_in(module)``; return the (original, stand-in)
    pairs. Paths that hold a stand-in already (a nested use) or nothing are left alone."""
    pairs = []
    for path in paths:
        module = find(model, path)
        if module is None or getattr(module, _STAND_IN, False):
            continue
        replacement = stand_in(module)
        setattr(replacement, _STAND_IN, True)
        parent, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, replacement)
        pairs.append((module, replacement))
    return pairs


@contextlib.contextmanager
def swapped(
    model: nn.Module,
    paths: list[str],
    stand_in: Callable[[nn.Module], nn.Module],
    restore: Callable[[nn.Module, nn.Module], None],
) -> Iterator[nn.Module]:
    """:func:`swap_in` within the block; on exit call ``restore(original, stand_in)`` (write the views
    back) and put the originals back."""
    pairs = swap_in(model, paths, stand_in)
    try:
        yield model
    finally:
        for module, replacement in pairs:
            restore(module, replacement)
        _put_back(model, {id(replacement): module for module, replacement in pairs})


class LinearViews:
    """Adapter mixin for a family whose site weights are stored other than as ``nn.Linear``: it names
    the modules (:meth:`linear_paths`), how to view one as linears (``stand_in``) and how to write the
    views back (``restore``); this gives its ``linear_form`` and ``to_linear_``."""

    stand_in: Callable[[nn.Module], nn.Module]
    restore: Callable[[nn.Module, nn.Module], None]

    def linear_paths(self, model: nn.Module) -> list[str]:
        """Model-relative paths of the modules that hold site weights in another layout."""
        raise NotImplementedError

    def linear_form(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """Those modules as ``nn.Linear`` views for the duration, written back on exit."""
        return swapped(model, self.linear_paths(model), type(self).stand_in, type(self).restore)

    def to_linear_(self, model: nn.Module) -> nn.Module:
        """Those modules as ``nn.Linear`` views for good (a serving conversion in memory)."""
        swap_in(model, self.linear_paths(model), type(self).stand_in)
        return model
