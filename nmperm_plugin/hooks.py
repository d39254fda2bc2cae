"""Plugin hooks (pluggy). Built-ins and third-party packages register the same way.

A third-party package exposes a module with ``@hookimpl`` functions under the entry-point group
``nmperm_plugin`` in its ``pyproject.toml``::

    [project.entry-points.nmperm_plugin]
    my_plugin = "my_package.nmperm_hooks"
"""

from __future__ import annotations

from functools import cache

import pluggy

PROJECT = "nmperm_plugin"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class Specs:
    @hookspec
    def nmperm_mask_generators(self) -> list:
        """Return :class:`nmperm_plugin.scores.MaskGenerator` objects to add."""

    @hookspec
    def nmperm_architectures(self) -> list:
        """Return :class:`nmperm_plugin.arch.base.Adapter` instances to add."""

    @hookspec
    def nmperm_solvers(self) -> dict:
        """Return ``{name: solver}`` permutation solvers, ``solver(scores [rows, C], pattern, rng) -> perm [C]``."""


@cache
def plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, with every installed ``nmperm_plugin`` entry point loaded."""
    manager = pluggy.PluginManager(PROJECT)
    manager.add_hookspecs(Specs)
    from . import builtin

    manager.register(builtin, name="builtin")
    manager.load_setuptools_entrypoints(PROJECT)
    return manager


def _collect(results: list) -> list:
    return [item for result in results for item in result]


def mask_generators() -> dict:
    """All registered mask generators by name."""
    return {g.name: g for g in _collect(plugin_manager().hook.nmperm_mask_generators())}


def architectures() -> list:
    """All registered architecture adapters."""
    return _collect(plugin_manager().hook.nmperm_architectures())


def solvers() -> dict:
    """All registered permutation solvers by name."""
    return {k: v for result in plugin_manager().hook.nmperm_solvers() for k, v in result.items()}


def get_mask_generator(name: str):
    generators = mask_generators()
    if name not in generators:
        raise ValueError(
            f"unknown scorer {name!r}; registered: {', '.join(sorted(generators))}. "
            "Add one with an `nmperm_mask_generators` hook (see nmperm_plugin.hooks)."
        )
    return generators[name]
