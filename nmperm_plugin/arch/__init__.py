"""Architecture adapters; :func:`get_adapter` finds the one registered for a model."""

from __future__ import annotations

from torch import nn

from ..hooks import architectures
from .base import FOLD_MODES, Adapter, Site

__all__ = ["Adapter", "Site", "FOLD_MODES", "get_adapter"]


def get_adapter(model: nn.Module) -> Adapter:
    """The registered adapter that handles ``model``; a clear error when none does."""
    adapters = architectures()
    for adapter in adapters:
        if adapter.matches(model):
            return adapter
    found = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    supported = ", ".join(f"{a.name} ({', '.join(getattr(a, 'model_types', ()))})" for a in adapters)
    raise ValueError(
        f"unsupported architecture {found!r}: supported are {supported}. To add one, implement "
        "nmperm_plugin.arch.base.Adapter and register it with an `nmperm_architectures` hook "
        "under the `nmperm_plugin` entry-point group (see docs/plugins.md)."
    )
