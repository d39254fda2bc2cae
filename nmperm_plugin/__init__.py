"""nmperm-plugin: learned channel permutations for N:M (2:4) sparse Transformers.

Importing the package registers :class:`LearnedPermutationModifier` with llm-compressor's
``ModifierFactory`` when llm-compressor is installed, so recipes can name it.
"""

from .api import permute_
from .learn import LearnConfig
from .nm import NMPattern, is_nm, nm_mask
from .pipeline import PermuteConfig, PruneResult, fold_, permute_and_prune_
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
