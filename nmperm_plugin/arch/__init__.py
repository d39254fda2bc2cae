"""Architecture adapters: how a model family maps onto permutation sites and folds them (SPEC 3).

Adapters are found through the ``nmperm_architectures`` hook: :func:`nmperm_plugin.plugins.registry.get_adapter`.
"""

from __future__ import annotations

from .base import FOLD_MODES, Adapter, Site

__all__ = ["Adapter", "Site", "FOLD_MODES"]
