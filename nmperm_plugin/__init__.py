"""nmperm-plugin: learned channel permutations for N:M (2:4) sparse Transformers.

Importing the package registers its built-in plugin (:mod:`nmperm_plugin.builtin`) with the plugin
registry, and :class:`LearnedPermutationModifier` with llm-compressor's ``ModifierFactory`` when
llm-compressor is installed, so recipes can name it.
"""

from . import (
    _startup,  # noqa: F401 - first: a Ctrl-C while the command imports torch exits quietly
    builtin,
)
from .api import permute_
from .config import LearnConfig, PermuteConfig
from .core.nm import NMPattern, is_nm, nm_mask
from .io.sidecar import Sidecar
from .learn.fold import fold_
from .learn.pipeline import PruneResult, permute_and_prune_
from .plugins.registry import register_builtin

__all__ = [
    "LearnConfig",
    "NMPattern",
    "PermuteConfig",
    "PruneResult",
    "Sidecar",
    "fold_",
    "is_nm",
    "nm_mask",
    "permute_",
    "permute_and_prune_",
]
__version__ = "0.1.0"

register_builtin(builtin)

try:  # registers LearnedPermutationModifier with llm-compressor's ModifierFactory
    from .llmcompressor.modifier import LearnedPermutationModifier  # noqa: F401 - exported below
except ImportError as _error:  # llm-compressor is not installed: the rest of the package works without it
    if _error.name is None or not _error.name.startswith(("llmcompressor", "compressed_tensors")):
        raise
else:
    __all__.append("LearnedPermutationModifier")
