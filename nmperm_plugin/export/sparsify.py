"""``sparsify_(model, config)``: the torchao-style call for 2:4 weights, without ``torchao.sparsity``.

torchao's main branch deleted ``torchao.sparsity`` (``sparsify_``, ``SemiSparseWeightConfig``; pytorch/ao PR
4728). Its bf16/fp16 path only wrapped PyTorch's own ``torch.sparse.to_sparse_semi_structured`` (cuSPARSELt or
CUTLASS), so that is what :class:`SemiSparseWeightConfig` here calls. FP8 2:4 goes through the torchao API
that stays, ``Float8DynamicActivationFloat8WeightConfig`` with its 2:4 packing format
(:class:`Float8SemiSparseWeightConfig`). Code written for torchao keeps its shape::

    # before: from torchao.sparsity import sparsify_, SemiSparseWeightConfig
    from nmperm_plugin.export import SemiSparseWeightConfig, sparsify_

    sparsify_(model.cuda().bfloat16(), SemiSparseWeightConfig(), filter_fn=lambda m, fqn: fqn != "lm_head")

Configs are plain data; the function that applies one is found in a registry keyed by the config's type
(:func:`register_sparsify_handler`), as torchao's ``quantize_`` does, so a new kind of conversion is a new
config class plus a handler, not a new branch. Unlike torchao, every matched layer is validated first
(2:4 pattern, dtype, the kernel's shape minimums) and nothing is converted unless all pass (``strict``), or
invalid layers are skipped with a warning; torch's conversion would otherwise silently drop values of a
weight that is not 2:4. The checks run on any device; the conversion itself needs a CUDA GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from loguru import logger
from torch import nn

from .. import compat
from ..core.nm import NMPattern, is_nm, nm_violations
from .validate import BACKEND_LABELS, BACKENDS, FP8_MIN_COLS, FP8_MIN_ROWS, SEMI_SPARSE_DTYPES, torch_dtype_name

TWO_FOUR = NMPattern(2, 4)
FilterFn = Callable[[nn.Module, str], bool]


class SparsifyError(RuntimeError):
    """A 2:4 conversion that cannot be done as asked: which layers, why, and what to do."""


@dataclass(frozen=True)
class SparsifyConfig:
    """Base of the configs :func:`sparsify_` accepts; a subclass is dispatched to its registered handler."""


@dataclass(frozen=True)
class SemiSparseWeightConfig(SparsifyConfig):
    """fp16/bf16 2:4 weights as PyTorch semi-structured tensors (``torch.sparse.to_sparse_semi_structured``).

    Attributes:
        backend: ``"cusparselt"`` (default; SM 8.0+ and a torch built with cuSPARSELt) or ``"cutlass"``
            (torch's CUTLASS kernel, SM 8.x only).
        alg_id: the cuSPARSELt algorithm id stored in the weight (0: the library default). ``serve()`` picks
            one per shape instead.
    """

    backend: str = "cusparselt"
    alg_id: int = 0

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown 2:4 backend {self.backend!r}: choose one of {', '.join(BACKENDS)}")
        if isinstance(self.alg_id, bool) or not isinstance(self.alg_id, int) or self.alg_id < 0:
            raise ValueError(f"alg_id must be a non-negative int (a cuSPARSELt algorithm id), got {self.alg_id!r}")
        if self.backend == "cutlass" and self.alg_id:
            raise ValueError("alg_id selects a cuSPARSELt algorithm; it has no meaning with backend='cutlass'")


@dataclass(frozen=True)
class Float8SemiSparseWeightConfig(SparsifyConfig):
    """FP8 2:4 through torchao: bf16 activations in, quantized per row to e4m3 on the fly; e4m3 per-row 2:4
    weights; torchao's CUTLASS sm90 kernel (``Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(),
    packing_format=...)``). SM 9.x (H100/H200) only; weights must be bf16."""


@dataclass(frozen=True)
class SparsifyHandler:
    """How one config type is applied.

    ``blocker(config, device)`` says why the conversion cannot run on ``device`` at all (None: it can);
    ``validate(module, config)`` lists why one module cannot be converted (empty: it can); ``convert(module,
    config)`` replaces the module's weight in place.
    """

    blocker: Callable[[SparsifyConfig, torch.device], str | None]
    validate: Callable[[nn.Module, SparsifyConfig], list[str]]
    convert: Callable[[nn.Module, SparsifyConfig], None]


HANDLERS: dict[type, SparsifyHandler] = {}


def register_sparsify_handler(
    config_type: type,
    *,
    blocker: Callable[[SparsifyConfig, torch.device], str | None],
    validate: Callable[[nn.Module, SparsifyConfig], list[str]],
    convert: Callable[[nn.Module, SparsifyConfig], None],
    replace: bool = False,
) -> SparsifyHandler:
    """Register how :func:`sparsify_` applies configs of ``config_type`` (and its subclasses).

    Raises ``ValueError`` when the type already has a handler, unless ``replace``.
    """
    if not isinstance(config_type, type):
        raise TypeError(f"register_sparsify_handler needs a config class, got {config_type!r}")
    if config_type in HANDLERS and not replace:
        raise ValueError(f"{config_type.__name__} already has a sparsify handler: pass replace=True to override it")
    HANDLERS[config_type] = SparsifyHandler(blocker=blocker, validate=validate, convert=convert)
    return HANDLERS[config_type]


def handler_for(config: object) -> SparsifyHandler:
    """The handler registered for ``type(config)`` or its nearest registered base class."""
    for cls in type(config).__mro__:
        if cls in HANDLERS:
            return HANDLERS[cls]
    known = ", ".join(sorted(cls.__name__ for cls in HANDLERS)) or "none"
    raise TypeError(
        f"sparsify_ has no handler for {type(config).__name__}: pass one of {known} "
        "(or register one with nmperm_plugin.export.register_sparsify_handler)"
    )


def is_linear(module: nn.Module, fqn: str) -> bool:
    """The default filter: every ``nn.Linear``."""
    return isinstance(module, nn.Linear)


def _first_weight_device(modules: list[tuple[str, nn.Module]]) -> torch.device:
    for _, module in modules:
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            return weight.device
    return torch.device("cpu")


def sparsify_(
    model: nn.Module, config: SparsifyConfig, filter_fn: FilterFn | None = None, *, strict: bool = True
) -> list[str]:
    """Convert the matching layers of ``model`` to 2:4 sparse weights in place; return their names.

    ``filter_fn(module, fqn)`` picks the layers (default: every ``nn.Linear``; pass one that excludes
    ``lm_head`` and other dense layers). Every picked layer is validated first. With ``strict`` (default) a
    single invalid layer raises :class:`SparsifyError` listing all of them and nothing is converted;
    without it the invalid layers are skipped with a warning. Raises :class:`SparsifyError` when the
    conversion cannot run where the weights are (e.g. on CPU: the 2:4 sparse matmul needs a CUDA GPU),
    and ``TypeError`` for a config type without a registered handler.
    """
    handler = handler_for(config)
    filter_fn = filter_fn or is_linear
    picked = [(fqn, module) for fqn, module in model.named_modules() if filter_fn(module, fqn)]
    invalid = {fqn: reasons for fqn, module in picked if (reasons := handler.validate(module, config))}
    if invalid and strict:
        listing = "\n".join(f"  {fqn or '<root>'}: {'; '.join(reasons)}" for fqn, reasons in invalid.items())
        raise SparsifyError(
            f"{len(invalid)} of {len(picked)} selected layers cannot take {type(config).__name__}, so nothing was "
            f"converted:\n{listing}\nExclude them with filter_fn, or pass strict=False to skip them"
        )
    for fqn, reasons in invalid.items():
        logger.warning(f"sparsify_: {fqn}: left dense: {'; '.join(reasons)}")
    todo = [(fqn, module) for fqn, module in picked if fqn not in invalid]
    if not todo:
        return []
    blocker = handler.blocker(config, _first_weight_device(todo))
    if blocker is not None:
        raise SparsifyError(blocker)
    for _, module in todo:
        handler.convert(module, config)
    return [fqn for fqn, _ in todo]


# --- shared checks ----------------------------------------------------------------------------------------


def _linear_weight(module: nn.Module) -> torch.Tensor | None:
    weight = getattr(module, "weight", None)
    return weight if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None


def pattern_problems(weight: torch.Tensor) -> list[str]:
    """Why a weight is not 2:4 along its input channels (empty when it is)."""
    if weight.shape[1] % 4:
        return [f"in_features {weight.shape[1]} not a multiple of 4, so not 2:4"]
    if type(weight.detach()) is not torch.Tensor:
        return [f"already converted ({type(weight.detach()).__name__}, not a dense weight)"]
    if not is_nm(weight.detach(), TWO_FOUR):
        return [f"not 2:4: {nm_violations(weight.detach(), TWO_FOUR)} groups of 4 hold more than 2 non-zeros"]
    return []


def shape_problems(weight: torch.Tensor, min_rows: int, min_cols: int, label: str) -> list[str]:
    """Why ``weight``'s ``[out_features, in_features]`` misses a kernel's minimum tile (empty when it fits)."""
    reasons = []
    checks = (("out_features", weight.shape[0], min_rows), ("in_features", weight.shape[1], min_cols))
    for what, size, minimum in checks:
        if size < minimum or size % minimum:
            reasons.append(f"{what} {size} not a multiple of {minimum} required by {label}")
    return reasons


def cuda_problem(device: torch.device, what: str) -> str | None:
    """The refusal for a conversion asked for off CUDA (None on a CUDA device)."""
    if device.type == "cuda":
        return None
    where = "this machine has no CUDA device" if not torch.cuda.is_available() else f"the weights are on {device}"
    return (
        f"{what} needs the weights on a CUDA GPU: the 2:4 sparse matmul runs only on NVIDIA sparse tensor cores, and "
        f"{where}. Move the model to CUDA first; on CPU, nmperm_plugin.export.to_torchao_ validates every layer "
        "and checks the 2:4 pack round trip without converting"
    )


# --- fp16/bf16: torch.sparse.to_sparse_semi_structured ----------------------------------------------------


def semi_sparse_blocker(config: SemiSparseWeightConfig, device: torch.device) -> str | None:
    """Why ``config``'s kernel cannot run on ``device`` (None when it can)."""
    problem = cuda_problem(device, "SemiSparseWeightConfig")
    if problem is not None:
        return problem
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 0):
        return f"2:4 sparse tensor cores need SM 8.0+; this GPU is SM {major}.{minor}"
    if config.backend == "cusparselt" and not torch.backends.cusparselt.is_available():
        return "this torch build has no cuSPARSELt: use SemiSparseWeightConfig(backend='cutlass') on an SM 8.x GPU"
    if config.backend == "cutlass" and major != 8:
        return (
            f"torch's CUTLASS bf16/fp16 2:4 kernel runs on SM 8.x only; this GPU is SM {major}.{minor}: "
            "use backend='cusparselt'"
        )
    return None


def semi_sparse_validate(module: nn.Module, config: SemiSparseWeightConfig) -> list[str]:
    """Why ``module`` cannot hold a ``config`` semi-structured weight (empty when it can)."""
    weight = _linear_weight(module)
    if weight is None:
        return [f"{type(module).__name__} has no 2-D weight"]
    reasons = pattern_problems(weight)
    if weight.dtype not in SEMI_SPARSE_DTYPES:
        reasons.append(f"dtype {torch_dtype_name(weight.dtype)}: cast the model to bfloat16 or float16 first")
        return reasons
    tile = compat.semi_structured_tile(config.backend, weight.dtype)
    return reasons + shape_problems(weight, tile.sparse_min_rows, tile.sparse_min_cols, BACKEND_LABELS[config.backend])


def semi_sparse_convert(module: nn.Module, config: SemiSparseWeightConfig) -> None:
    """Replace ``module.weight`` by ``torch.sparse.to_sparse_semi_structured(weight)`` (what torchao did)."""
    with compat.force_cutlass(config.backend == "cutlass"):
        sparse = torch.sparse.to_sparse_semi_structured(module.weight.detach().contiguous(), alg_id=config.alg_id)
    module.weight = nn.Parameter(sparse, requires_grad=False)


register_sparsify_handler(
    SemiSparseWeightConfig, blocker=semi_sparse_blocker, validate=semi_sparse_validate, convert=semi_sparse_convert
)


# --- FP8 2:4: torchao Float8DynamicActivationFloat8WeightConfig --------------------------------------------


def fp8_blocker(config: Float8SemiSparseWeightConfig, device: torch.device) -> str | None:
    """Why FP8 2:4 cannot run on ``device`` (None when it can); also checks the torchao API is there."""
    problem = cuda_problem(device, "Float8SemiSparseWeightConfig")
    if problem is not None:
        return problem
    major, minor = torch.cuda.get_device_capability(device)
    if major != 9:
        return f"FP8 2:4 (torchao CUTLASS sm90 kernel) needs an SM 9.x GPU (H100/H200); this one is SM {major}.{minor}"
    compat.torchao_fp8_config(sparse=True)  # raises, naming torchao's version and the supported range
    return None


def fp8_validate(module: nn.Module, config: Float8SemiSparseWeightConfig) -> list[str]:
    """Why ``module`` cannot take FP8 2:4 (empty when it can): 2:4, bf16, torchao's 16 x 32 minimums."""
    weight = _linear_weight(module)
    if weight is None:
        return [f"{type(module).__name__} has no 2-D weight"]
    reasons = pattern_problems(weight)
    if weight.dtype != torch.bfloat16:
        reasons.append(f"dtype {torch_dtype_name(weight.dtype)}: FP8 per-row quantization needs bfloat16 weights")
    return reasons + shape_problems(weight, FP8_MIN_ROWS, FP8_MIN_COLS, BACKEND_LABELS["fp8"])


def fp8_convert(module: nn.Module, config: Float8SemiSparseWeightConfig) -> None:
    """Quantize ``module`` to FP8 2:4 with torchao's ``quantize_`` (the module alone)."""
    module.weight.data = module.weight.data.contiguous()
    compat.torchao_quantize_(module, compat.torchao_fp8_config(sparse=True), filter_fn=lambda m, fqn: m is module)


register_sparsify_handler(Float8SemiSparseWeightConfig, blocker=fp8_blocker, validate=fp8_validate, convert=fp8_convert)
