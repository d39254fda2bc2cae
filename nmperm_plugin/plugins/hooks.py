"""Plugin hook specifications (pluggy). Built-ins and third-party packages register the same way.

A third-party package exposes a module with ``@hookimpl`` functions under the entry-point group
``nmperm_plugin`` in its ``pyproject.toml``::

    [project.entry-points.nmperm_plugin]
    my_plugin = "my_package.nmperm_hooks"

The plugin manager and the look-ups live in :mod:`nmperm_plugin.plugins.registry`.
"""

from __future__ import annotations

import pluggy

PROJECT = "nmperm_plugin"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class Specs:
    @hookspec
    def nmperm_mask_generators(self) -> list:
        """Return :class:`nmperm_plugin.core.scores.MaskGenerator` objects to add."""

    @hookspec
    def nmperm_architectures(self) -> list:
        """Return :class:`nmperm_plugin.arch.base.Adapter` instances to add."""

    @hookspec
    def nmperm_solvers(self) -> dict:
        """Return ``{name: solver}`` permutation solvers, ``solver(scores [rows, C], pattern, rng) -> perm [C]``."""

    @hookspec
    def nmperm_objectives(self) -> list:
        """Return :class:`~nmperm_plugin.learn.sequential.ObjectiveStrategy` instances to add (what
        ``objective:`` names)."""
