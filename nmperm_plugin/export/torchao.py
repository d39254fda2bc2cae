"""Convert the N:M-pruned linears of a model to 2:4 sparse kernels (fp16/bf16 or FP8), validating everything first.

``to_torchao_(model, config)`` validates every linear layer (pattern, dtype, the backend's shape
minimums), packs each valid weight into the compressed 2:4 representation and checks the round trip
(any device), and on a supported CUDA GPU converts it in place with :func:`nmperm_plugin.export.sparsify_`:

- fp16/bf16: ``SemiSparseWeightConfig`` -> PyTorch's ``torch.sparse.to_sparse_semi_structured``; cuSPARSELt
  by default, CUTLASS with ``backend="cutlass"`` (no ``torchao.sparsity``, which torchao's main branch deleted);
- FP8: ``Float8SemiSparseWeightConfig`` -> torchao's ``quantize_(model,
  Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), packing_format=<2:4 CUTLASS>))`` (SM 9.x only).

Layers that fail a requirement stay dense and the report says why; nothing is converted wrongly. (The
module keeps its name, and ``TorchaoExportConfig`` its, for the code written against them.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from loguru import logger
from torch import nn
from tqdm import tqdm

from .. import compat
from ..io.sidecar import Sidecar
from .pack import roundtrip_exact
from .report import CONVERTED, DENSE, READY, ExportReport, LayerResult
from .sparsify import Float8SemiSparseWeightConfig, SemiSparseWeightConfig, SparsifyConfig, sparsify_
from .validate import BACKENDS, PRECISIONS, torch_dtype_name, validate_linear

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}


FP8_PROBE_TOLERANCE = 0.125  # relative L2 error of a probe output: e4m3 rounding gives ~0.05, wrong metadata ~1


CPU_NOTE = (
    "layers were validated and packed on CPU only; the 2:4 sparse matmul needs a CUDA GPU "
    "(SM 8.0+ for fp16/bf16, SM 9.x for FP8), so nothing was converted"
)


@dataclass
class TorchaoExportConfig:
    """How to convert: precision, 2:4 backend, whether to check, and where.

    Attributes:
        dtype: ``"bf16"`` or ``"fp16"`` cast the model's parameters first; ``"fp8"`` casts to bf16 and
            quantizes converted layers to FP8 2:4 (dynamic per-row activations, per-row weights);
            ``None`` keeps the stored dtype (float32 layers are then reported, not converted).
        backend: ``"cusparselt"`` (default for fp16/bf16) or ``"cutlass"`` (the only FP8 2:4 backend).
        check: pack and unpack every valid weight and require an exact round trip; on a GPU, also
            verify each converted weight against the dense one (restoring it if they differ).
        device: ``"cuda"``/``"cpu"``; None picks CUDA when available. The model is moved there.
    """

    dtype: str | None = None
    backend: str | None = None
    check: bool = True
    device: str | None = None

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in PRECISIONS:
            raise ValueError(f"unknown export dtype {self.dtype!r}: choose one of {', '.join(PRECISIONS)}")
        if self.backend is None:
            self.backend = "cutlass" if self.dtype == "fp8" else "cusparselt"
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown 2:4 backend {self.backend!r}: choose one of {', '.join(BACKENDS)}")
        if self.dtype == "fp8" and self.backend != "cutlass":
            raise ValueError(
                "FP8 2:4 in torchao runs only on CUTLASS (Float8PackingFormat.SPARSE_CUTLASS, SM 9.x): "
                "use --backend cutlass or leave --backend unset"
            )

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """The floating dtype parameters are cast to before conversion (None: keep)."""
        return TORCH_DTYPES.get(self.dtype) if self.dtype else None

    @property
    def fp8(self) -> bool:
        return self.dtype == "fp8"


def is_gather_module(module: nn.Module) -> bool:
    """True for the run-time gather modules of ``fold: gather`` (``GatherNorm``, ``GatherLinear``)."""
    return type(module).__name__.startswith("Gather") and hasattr(module, "perm")


def find_linears(model: nn.Module) -> list[tuple[str, str, nn.Linear]]:
    """Every ``nn.Linear`` as (sidecar name, module path, module).

    The real linear inside a ``GatherLinear`` (its ``.linear`` child) is named after the wrapper,
    which is how the sidecar lists it.
    """
    gathers = {name for name, module in model.named_modules() if is_gather_module(module)}
    found = []
    for path, module in model.named_modules():
        if isinstance(module, nn.Linear):
            parent, _, child = path.rpartition(".")
            found.append((parent if child == "linear" and parent in gathers else path, path, module))
    return found


def prepare_gathers_(model: nn.Module, sidecar: Sidecar | None) -> None:
    """Re-apply the per-layer gathers of a ``fold: gather`` model (unless already applied), in place."""
    if sidecar is None or sidecar.fold != "gather":
        return
    if any(is_gather_module(module) for module in model.modules()):
        return
    from ..learn.fold import apply_gather

    logger.info("fold: gather checkpoint: applying the per-layer gathers so the pruned weights become N:M")
    apply_gather(model, sidecar)


def linearise_(model: nn.Module) -> None:
    """Weights stored other than as ``nn.Linear`` (GPT-2's ``Conv1D``, fused experts) as ``nn.Linear``
    layers, in place, through the model's adapter (``to_linear_``; no adapter: the model as it is)."""
    from ..plugins.registry import find_adapter

    adapter = find_adapter(model)
    if adapter is not None:
        adapter.to_linear_(model)


@torch.no_grad()
def cast_parameters_(model: nn.Module, dtype: torch.dtype | None) -> None:
    """Cast floating parameters (not buffers such as rotary frequencies) to ``dtype``, keeping ties."""
    if dtype is None:
        return
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)


def resolve_device(config: TorchaoExportConfig) -> torch.device:
    """``config.device``, or CUDA when available, else CPU."""
    if config.device is not None:
        return torch.device(config.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def gpu_blocker(config: TorchaoExportConfig, device: torch.device) -> str | None:
    """Why the chosen kernels cannot run on ``device`` (None when they can)."""
    if device.type != "cuda":
        return f"{'device cpu requested' if torch.cuda.is_available() else 'no CUDA device'}: {CPU_NOTE}"
    major, minor = torch.cuda.get_device_capability(device)
    if config.fp8 and major != 9:
        return f"FP8 2:4 (torchao CUTLASS sm90 kernel) needs an SM 9.x GPU (H100/H200); this one is SM {major}.{minor}"
    if config.fp8:
        try:
            compat.torchao_fp8_config(sparse=True)
        except compat.CompatError as error:
            return str(error)
    if (major, minor) < (8, 0):
        return f"2:4 sparse tensor cores need SM 8.0+; this GPU is SM {major}.{minor}"
    if not config.fp8 and config.backend == "cusparselt" and not torch.backends.cusparselt.is_available():
        return "this torch build has no cuSPARSELt: use --backend cutlass"
    if not config.fp8 and config.backend == "cutlass" and major != 8:
        # torch's CUTLASS 2:4 kernels are built for SM 8.x only (seen refusing an H200, SM 9.0)
        return (
            f"torch's CUTLASS bf16/fp16 2:4 kernel runs on SM 8.x only; this GPU is SM {major}.{minor}: "
            "use --backend cusparselt"
        )
    return None


def check_layer(name: str, weight: torch.Tensor, config: TorchaoExportConfig, sidecar: Sidecar | None) -> LayerResult:
    """Validate one layer and, when valid and ``config.check``, require an exact 2:4 pack round trip."""
    result = validate_linear(
        name,
        weight.detach(),
        backend=config.backend,
        precision=config.dtype or "",
        declared=sidecar.nm if sidecar is not None else None,
        pruned=None if sidecar is None else name in sidecar.frames,
        gather_hint=sidecar is not None and sidecar.fold == "gather",
    )
    if result.status == READY and config.check:
        result.roundtrip = roundtrip_exact(weight)
        if not result.roundtrip:
            result.status, result.reason = DENSE, "2:4 pack/unpack round trip not exact"
    return result


def torchao_config(config: TorchaoExportConfig) -> SparsifyConfig:
    """The :func:`sparsify_` config for ``config``'s precision and backend."""
    if config.fp8:
        return Float8SemiSparseWeightConfig()
    return SemiSparseWeightConfig(backend=config.backend)


force_cutlass = compat.force_cutlass  # kept here for callers of the earlier module layout (bench/serve_speed.py)


def is_converted(weight: torch.Tensor, fp8: bool) -> bool:
    """True when ``weight`` is now a 2:4 sparse tensor (torch semi-structured; FP8: torchao's 2:4 class)."""
    if fp8:
        return isinstance(weight, compat.torchao_fp8_sparse_types())
    return isinstance(weight, torch.sparse.SparseSemiStructuredTensor)


@torch.no_grad()
def converted_matches(linear: nn.Linear, reference: torch.Tensor, fp8: bool) -> bool:
    """Whether a converted linear reproduces its dense weight (exactly; FP8: within rounding on a probe)."""
    if not fp8:
        return torch.equal(linear.weight.to_dense(), reference)
    probe = torch.randn(32, reference.shape[1], device=reference.device, dtype=reference.dtype)
    expected = F.linear(probe, reference, linear.bias)
    error = (linear(probe).float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-12)
    return bool(error < FP8_PROBE_TOLERANCE)


def apply_torchao_(model: nn.Module, path: str, sparsify_config: SparsifyConfig, fp8: bool) -> None:
    """Run :func:`sparsify_` with ``sparsify_config`` on the one linear at ``path``."""
    sparsify_(model, sparsify_config, filter_fn=lambda module, fqn: fqn == path)


def convert_linear_(
    model: nn.Module, path: str, linear: nn.Linear, sparsify_config: SparsifyConfig, config: TorchaoExportConfig
) -> str | None:
    """Convert one linear in place; return why it stayed dense, or None when it was converted."""
    original = linear.weight
    linear.weight.data = linear.weight.data.contiguous()
    try:
        apply_torchao_(model, path, sparsify_config, config.fp8)
    except (RuntimeError, AssertionError, NotImplementedError, ValueError) as error:
        linear.weight = original
        return f"conversion refused it: {str(error).splitlines()[0]}"
    if not is_converted(linear.weight, config.fp8):
        linear.weight = original
        return "conversion left it dense"
    if config.check and not converted_matches(linear, original.detach(), config.fp8):
        linear.weight = original
        return "converted weight did not reproduce the dense weight: restored dense"
    return None


def convert_ready_(model: nn.Module, report: ExportReport, paths: dict[str, tuple[str, nn.Linear]], config) -> None:
    """Convert every ``ready`` layer of ``report`` with :func:`sparsify_`, updating its status."""
    sparsify_config = torchao_config(config)
    ready = [layer for layer in report.layers if layer.status == READY]
    for layer in tqdm(ready, desc="2:4 convert", unit="layer", disable=None):
        path, linear = paths[layer.name]
        failure = convert_linear_(model, path, linear, sparsify_config, config)
        layer.status, layer.reason = (DENSE, failure) if failure else (CONVERTED, "")


def new_report(config: TorchaoExportConfig, device: torch.device, model: nn.Module) -> ExportReport:
    """An empty report describing this run."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    stored = {torch_dtype_name(p.dtype) for p in model.parameters() if p.is_floating_point()}
    return ExportReport(
        target="torchao",
        backend="CUTLASS" if config.backend == "cutlass" else "cuSPARSELt",
        precision=config.dtype or f"stored {'/'.join(sorted(stored))}",
        device=name,
        gathers=[path for path, module in model.named_modules() if is_gather_module(module)],
    )


def to_torchao_(
    model: nn.Module, config: TorchaoExportConfig | None = None, sidecar: Sidecar | None = None
) -> ExportReport:
    """Convert ``model``'s N:M-pruned linears to torchao 2:4 sparse weights in place; report every layer.

    With a ``sidecar`` only the layers it lists are candidates (others are reported as not pruned),
    ``fold: gather`` gathers are re-applied first when missing, and a listed layer whose weight is not
    N:M is a problem (``report.ok`` is False). Without one, every 2:4 linear is a candidate. Without a
    CUDA GPU the model is validated and packed but not converted, and the report says so.
    """
    config = config or TorchaoExportConfig()
    device = resolve_device(config)
    prepare_gathers_(model, sidecar)
    linearise_(model)
    cast_parameters_(model, config.torch_dtype)
    model.to(device)
    report = new_report(config, device, model)
    linears = find_linears(model)
    for name, _, linear in tqdm(linears, desc="validate 2:4", unit="layer", disable=None):
        report.layers.append(check_layer(name, linear.weight, config, sidecar))
    if sidecar is not None:
        report.missing = sorted(set(sidecar.frames) - {name for name, _, _ in linears})
    blocker = gpu_blocker(config, device)
    if blocker is None:
        convert_ready_(model, report, {name: (path, linear) for name, path, linear in linears}, config)
    else:
        report.notes.append(blocker)
        logger.warning(blocker)
    if report.gathers:
        report.notes.append(
            f"{len(report.gathers)} gathers stay cheap index gathers (index_select after the norm or before o_proj); "
            "torch.compile fuses each norm's gather into the norm kernel"
        )
    logger.info(report.summary())
    return report
