"""The plugin manager and the look-ups of everything registered through :mod:`nmperm_plugin.plugins.hooks`:
mask generators, architecture adapters, permutation solvers and objectives.

The registry imports no plugin: the package registers its built-in plugin
(:mod:`nmperm_plugin.builtin`) with :func:`register_builtin` when it is imported, and third-party
plugins come through the ``nmperm_plugin`` entry-point group. So everything below the public API
can look names up without importing what implements them."""

from __future__ import annotations

import dataclasses
from functools import cache

import pluggy
from torch import nn

from ..arch import Adapter
from .hooks import PROJECT, Specs

_BUILTINS: list[object] = []


def register_builtin(plugin: object) -> None:
    """Register the package's own plugin (before any third-party one), now or when the manager is made."""
    if plugin not in _BUILTINS:
        _BUILTINS.append(plugin)
        if plugin_manager.cache_info().currsize:
            plugin_manager().register(plugin, name="builtin")


@cache
def plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager: the built-ins, then every installed ``nmperm_plugin`` entry point."""
    manager = pluggy.PluginManager(PROJECT)
    manager.add_hookspecs(Specs)
    for plugin in _BUILTINS:
        manager.register(plugin, name="builtin")
    manager.load_setuptools_entrypoints(PROJECT)
    return manager


def _collect(results: list) -> list:
    return [item for result in results for item in result]


def mask_generators() -> dict:
    """All registered mask generators by name."""
    return {g.name: g for g in _collect(plugin_manager().hook.nmperm_mask_generators())}


def architectures() -> list[Adapter]:
    """All registered architecture adapters."""
    return _collect(plugin_manager().hook.nmperm_architectures())


def solvers() -> dict:
    """All registered permutation solvers by name."""
    return {k: v for result in plugin_manager().hook.nmperm_solvers() for k, v in result.items()}


def objectives() -> dict:
    """All registered objective strategies by name."""
    return {o.name: o for o in _collect(plugin_manager().hook.nmperm_objectives())}


def names(kind: str) -> tuple[str, ...]:
    """The names a registry-backed configuration field accepts: ``kind`` is a field's ``registry``
    metadata (``mask_generators``, ``solvers``, ``objectives``, or ``methods``: the solvers and
    ``learned``)."""
    if kind == "methods":
        return (*solvers(), "learned")
    return tuple({"mask_generators": mask_generators, "solvers": solvers, "objectives": objectives}[kind]())


def check_names(config) -> None:
    """Refuse a :class:`~nmperm_plugin.config.PermuteConfig` naming a plugin that is not registered
    (the configuration is plain data: its names are checked here, when a run starts)."""
    for spec in dataclasses.fields(config):
        kind = spec.metadata.get("registry")
        if kind is not None and getattr(config, spec.name) not in names(kind):
            value = getattr(config, spec.name)
            raise ValueError(f"unknown {spec.name} {value!r}; choose one of {', '.join(names(kind))}")


def _lookup(kind: str, name: str, registered: dict, hook: str):
    if name not in registered:
        raise ValueError(
            f"unknown {kind} {name!r}; registered: {', '.join(sorted(registered))}. "
            f"Add one with an `{hook}` hook (see docs/plugins.md)."
        )
    return registered[name]


def get_mask_generator(name: str):
    """The mask generator registered as ``name``; a clear error naming the registered ones."""
    return _lookup("scorer", name, mask_generators(), "nmperm_mask_generators")


def get_solver(name: str):
    """The permutation solver registered as ``name``."""
    return _lookup("method", name, solvers(), "nmperm_solvers")


def get_objective(name: str):
    """The objective strategy registered as ``name``."""
    return _lookup("objective", name, objectives(), "nmperm_objectives")


def adapter_named(name: str) -> Adapter | None:
    """The registered adapter called ``name`` (a sidecar's ``architecture``), or None."""
    return next((adapter for adapter in architectures() if adapter.name == name), None)


def find_adapter(model: nn.Module) -> Adapter | None:
    """The registered adapter that handles ``model``, or None."""
    return next((adapter for adapter in architectures() if adapter.matches(model)), None)


def get_adapter(model: nn.Module) -> Adapter:
    """The registered adapter that handles ``model``; a clear error when none does."""
    adapter = find_adapter(model)
    if adapter is not None:
        return adapter
    adapters = architectures()
    found = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    supported = ", ".join(f"{a.name} ({', '.join(getattr(a, 'model_types', ()))})" for a in adapters)
    raise ValueError(
        f"unsupported architecture {found!r}: supported are {supported}. To add one, name a decoder-only "
        "model's modules in a nmperm_plugin.arch.decoder.DecoderAdapter subclass (or implement "
        "nmperm_plugin.arch.base.Adapter) and register it with an `nmperm_architectures` hook under the "
        "`nmperm_plugin` entry-point group (see docs/plugins.md and docs/architectures.md)."
    )
