"""Optional dependencies of a test module: skip naming the missing module, or fail where it must be there.

A test module that needs an optional package imports it with :func:`require` at module level. When
the import raises ImportError (ModuleNotFoundError included; any other exception propagates and
fails the collection):

- where the environment variable ``NMPERM_OPTIONAL`` (comma-separated module names) names the
  module, it FAILS: that environment is meant to run these tests. ``.ci/run``'s second stage, the
  one that installs timm and torchvision, sets ``NMPERM_OPTIONAL=timm,torchvision``;
- under CI (``CI=true``) it FAILS unless the module is in :data:`TESTED_ELSEWHERE`, the modules
  ``.ci/run`` deliberately leaves out of its first environment (where ``python -m pytest -q``
  collects every file) because its second stage installs them and runs their test files there;
- elsewhere (a developer's machine) it skips the module, naming the missing module and the error.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

# modules .ci/run's first environment lacks on purpose: its second stage installs them (torch 2.14.1
# with torchvision 0.29.1, timm 1.0.31) and runs tests/test_timm_vit.py and tests/test_qwen_vl_processor.py
TESTED_ELSEWHERE = frozenset({"timm", "torchvision"})


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def required_here() -> set[str]:
    return {name.strip() for name in os.environ.get("NMPERM_OPTIONAL", "").split(",") if name.strip()}


def require(module: str, why: str = "") -> ModuleType:
    """``import module``, or skip (fail, see the module docstring) naming what is missing."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        missing = getattr(error, "name", None) or module
        message = f"optional module {module!r} does not import (missing {missing!r}: {error})" + (
            f"; {why}" if why else ""
        )
        if module in required_here() or missing in required_here():
            pytest.fail(f"{message}; NMPERM_OPTIONAL={os.environ['NMPERM_OPTIONAL']} requires it", pytrace=False)
        if in_ci() and not {module, missing} <= TESTED_ELSEWHERE | {None}:
            pytest.fail(f"{message}; under CI only {sorted(TESTED_ELSEWHERE)} may be missing", pytrace=False)
        pytest.skip(message, allow_module_level=True)
