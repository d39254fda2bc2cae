"""nmperm-plugin: learned channel permutations for N:M (2:4) sparse Transformers.

Importing the package registers :class:`LearnedPermutationModifier` with llm-compressor's
``ModifierFactory`` when llm-compressor is installed, so recipes can name it.
"""

from . import _startup  # noqa: F401 - first: a Ctrl-C while the command imports torch exits quietly
from .api import permute_
from .config import PermuteConfig
from .fold import fold_
from .learn import LearnConfig
from .nm import NMPattern, is_nm, nm_mask
from .pipeline import PruneResult, permute_and_prune_
from .sidecar import Sidecar

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

try:  # registers LearnedPermutationModifier with llm-compressor's ModifierFactory
    from .modifier import LearnedPermutationModifier  # noqa: F401 - exported below
except ImportError as _error:  # llm-compressor is not installed: the rest of the package works without it
    if _error.name is None or not _error.name.startswith(("llmcompressor", "compressed_tensors")):
        raise
else:
    __all__.append("LearnedPermutationModifier")
