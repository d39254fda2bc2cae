"""The built-in plugin: mask generators, the Llama-family adapter and the heuristic solvers."""

from __future__ import annotations

from .hooks import hookimpl


@hookimpl
def nmperm_mask_generators() -> list:
    from .scores import BUILTIN_GENERATORS

    return list(BUILTIN_GENERATORS)


@hookimpl
def nmperm_architectures() -> list:
    from .arch.llama import LlamaAdapter

    return [LlamaAdapter()]


@hookimpl
def nmperm_solvers() -> dict:
    from .baselines import HEURISTICS

    return dict(HEURISTICS)
