"""cuSPARSELt 2:4 linears for serving: the weight compressed once, an algorithm id chosen once per
problem shape (timed, or cuSPARSELt's own search) and shared by every layer of that shape, and
``torch._cslt_sparse_mm`` called directly (through :mod:`nmperm_plugin.compat`). Everything here needs
a CUDA GPU with cuSPARSELt; on CPU each entry point refuses with a message saying so. Used by
:mod:`.serving`."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from loguru import logger
from torch import nn

from .. import compat
from .sparsify import SEMI_SPARSE_DTYPES, cuda_problem, pattern_problems, shape_problems

TUNE_METHODS = ("time", "search", "off")
ALG_CACHE: dict[tuple, int] = {}  # (out, in, padded tokens, dtype, bias) -> cuSPARSELt algorithm id


class ServeError(RuntimeError):
    """The serving path cannot run as asked (no CUDA, no cuSPARSELt, an unsupported layer or shape)."""


def require_cuda(what: str) -> torch.device:
    """The current CUDA device, or :class:`ServeError` saying ``what`` needs one."""
    if not torch.cuda.is_available():
        raise ServeError(
            f"{what} needs a CUDA GPU: CUDA graphs and the cuSPARSELt / CUTLASS 2:4 sparse kernels run only on "
            f"CUDA, and torch {torch.__version__} here sees no CUDA device. On CPU, nmperm_plugin.export.to_torchao_ "
            "(or `nmperm export` without --serve) validates every layer and checks the 2:4 pack round trip"
        )
    return torch.device("cuda", torch.cuda.current_device())


def require_cusparselt(what: str) -> None:
    """:class:`ServeError` unless this torch build has cuSPARSELt and a CUDA device."""
    require_cuda(what)
    if not torch.backends.cusparselt.is_available():
        raise ServeError(
            f"{what} needs cuSPARSELt, which this torch build ({torch.__version__}) lacks: keep the layers as "
            "SparseSemiStructuredTensor weights (serve(..., tune='off') leaves them so) or use a CUDA build of torch"
        )


def padded_rows(rows: int, multiple: int) -> int:
    """``rows`` rounded up to a multiple of ``multiple`` (cuSPARSELt's dense-operand minimum)."""
    return rows + (-rows) % multiple


def alg_key(out_features: int, in_features: int, rows: int, dtype: torch.dtype, bias: bool) -> tuple:
    """The :data:`ALG_CACHE` key: one algorithm choice per problem shape, shared by every layer of that shape."""
    return (out_features, in_features, rows, str(dtype).removeprefix("torch."), bias)


def alg_candidates(search: int | None) -> list[int]:
    """Algorithm ids to try: ``0..max`` when torch knows the library's maximum, else the default and ``search``."""
    top = compat.cusparselt_max_alg_id()
    ids = list(range(top + 1)) if top is not None else [0]
    if search is not None and search not in ids:
        ids.append(search)
    return ids


def time_graph_ms(fn: Callable[[], object], repeats: int, replays: int = 3) -> float:
    """GPU time of one ``fn()`` in ms: ``repeats`` calls captured in one CUDA graph, median of ``replays`` replays."""
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        for _ in range(repeats):
            fn()
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / repeats)
    return statistics.median(times)


@torch.no_grad()
def choose_alg_id(
    packed: torch.Tensor,
    out_features: int,
    in_features: int,
    rows: int,
    dtype: torch.dtype,
    bias: torch.Tensor | None,
    method: str = "time",
    repeats: int = 10,
) -> int:
    """The cuSPARSELt algorithm id for ``W [out, in] @ x.T`` with ``rows`` rows of ``x``, chosen once and cached.

    ``"time"`` runs every candidate id (an id the library rejects is skipped) in a CUDA graph and keeps the
    fastest; ``"search"`` asks cuSPARSELt (``torch._cslt_sparse_mm_search``); ``"off"`` returns 0.
    """
    if method not in TUNE_METHODS:
        raise ValueError(f"unknown tune method {method!r}: choose one of {', '.join(TUNE_METHODS)}")
    if method == "off":
        return 0
    key = alg_key(out_features, in_features, rows, dtype, bias is not None)
    if key in ALG_CACHE:
        return ALG_CACHE[key]
    x = torch.randn(rows, in_features, device=packed.device, dtype=dtype)
    try:
        searched = compat.cslt_search(packed, x.t(), bias=bias, transpose_result=True)
    except (RuntimeError, compat.CompatError) as error:
        logger.debug(f"cuSPARSELt search failed for {key}: {error}")
        searched = None
    if method == "search":
        ALG_CACHE[key] = searched if searched is not None else 0
        return ALG_CACHE[key]
    timings: dict[int, float] = {}
    for alg_id in alg_candidates(searched):
        call = lambda a=alg_id: compat.cslt_sparse_mm(packed, x.t(), bias=bias, transpose_result=True, alg_id=a)  # noqa: E731
        try:
            call()  # eager first: an id the library rejects raises here, outside any capture
            torch.cuda.synchronize()
        except RuntimeError:
            continue
        timings[alg_id] = time_graph_ms(call, repeats)
    if not timings:
        raise ServeError(f"no cuSPARSELt algorithm ran for a {out_features} x {in_features} weight at {rows} rows")
    ALG_CACHE[key] = min(timings, key=timings.get)
    logger.debug(f"cuSPARSELt {key}: alg {ALG_CACHE[key]} ({timings[ALG_CACHE[key]]:.4f} ms; default {timings.get(0)})")
    return ALG_CACHE[key]


class CusparseltLinear(nn.Module):
    """A 2:4 linear layer calling cuSPARSELt directly: compressed once, one algorithm id per token count.

    ``forward(x)`` pads the rows of ``x`` to cuSPARSELt's dense minimum, computes ``W @ x.T`` with the
    transposed-result fusion (so the result is already ``[rows, out_features]``) and crops. It has no
    tensor-subclass dispatch and no host work beyond the op's own set-up, which a CUDA graph removes.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        require_cusparselt("CusparseltLinear")
        problems = self.problems(weight)
        if problems:
            raise ServeError(f"CusparseltLinear cannot take this weight: {'; '.join(problems)}")
        tile = compat.semi_structured_tile("cusparselt", weight.dtype)
        self.out_features, self.in_features = weight.shape
        self.row_multiple = tile.dense_min_rows
        self.register_buffer("packed", compat.cslt_compress(weight.detach().contiguous()))
        self.register_buffer("bias", None if bias is None else bias.detach().to(weight.dtype).contiguous())
        self.alg_ids: dict[int, int] = {}

    @staticmethod
    def problems(weight: torch.Tensor) -> list[str]:
        """Why ``weight`` cannot become a :class:`CusparseltLinear` (empty when it can)."""
        if weight.dim() != 2:
            return [f"weight must be 2-D, got shape {tuple(weight.shape)}"]
        reasons = [] if weight.is_cuda else [cuda_problem(weight.device, "CusparseltLinear")]
        reasons += pattern_problems(weight)
        if weight.dtype not in SEMI_SPARSE_DTYPES:
            return reasons + [f"dtype {weight.dtype}: cast the model to bfloat16 or float16 first"]
        tile = compat.semi_structured_tile("cusparselt", weight.dtype)
        return reasons + shape_problems(weight, tile.sparse_min_rows, tile.sparse_min_cols, "cuSPARSELt")

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> CusparseltLinear:
        """From an ``nn.Linear`` with a dense 2:4 weight or a cuSPARSELt ``SparseSemiStructuredTensor`` weight."""
        weight = linear.weight
        if isinstance(weight, torch.sparse.SparseSemiStructuredTensor):
            weight = weight.to_dense()
        return cls(weight, linear.bias)

    def tune_(self, token_counts: Iterable[int], method: str = "time", repeats: int = 10) -> dict[int, int]:
        """Choose the algorithm id for each token count (shared with every layer of this shape); returns them."""
        for tokens in token_counts:
            rows = padded_rows(tokens, self.row_multiple)
            self.alg_ids[rows] = choose_alg_id(
                self.packed, self.out_features, self.in_features, rows, self.packed.dtype, self.bias, method, repeats
            )
        return dict(self.alg_ids)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T + bias`` for ``x [..., in_features]``."""
        leading = x.shape[:-1]
        rows_in = x.reshape(-1, self.in_features)
        tokens = rows_in.shape[0]
        rows = padded_rows(tokens, self.row_multiple)
        if rows != tokens:
            rows_in = F.pad(rows_in, (0, 0, 0, rows - tokens))
        out = compat.cslt_sparse_mm(
            self.packed, rows_in.t(), bias=self.bias, transpose_result=True, alg_id=self.alg_ids.get(rows, 0)
        )
        if rows != tokens:
            out = out[:tokens]
        return out.reshape(*leading, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, alg_ids={self.alg_ids}"


def is_cusparselt_weight(module: nn.Module, fqn: str) -> bool:
    """The default swap filter: linears whose weight ``sparsify_`` made a cuSPARSELt semi-structured tensor."""
    return isinstance(module, nn.Linear) and isinstance(
        module.weight, getattr(torch.sparse, "SparseSemiStructuredTensorCUSPARSELT", ())
    )


def prepare_linears_(
    model: nn.Module,
    token_counts: Iterable[int],
    tune: str = "time",
    repeats: int = 10,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
) -> list[str]:
    """Replace the cuSPARSELt 2:4 linears of ``model`` by tuned :class:`CusparseltLinear` layers, in place.

    ``filter_fn(module, fqn)`` picks them (default: :func:`is_cusparselt_weight`; pass one that picks dense 2:4
    ``nn.Linear`` layers to convert those directly). Returns the names replaced.
    """
    require_cusparselt("prepare_linears_")
    token_counts = list(token_counts)
    filter_fn = filter_fn or is_cusparselt_weight
    picked = [(fqn, module) for fqn, module in model.named_modules() if fqn and filter_fn(module, fqn)]
    for fqn, module in picked:
        layer = CusparseltLinear.from_linear(module)
        layer.tune_(token_counts, tune, repeats)
        parent, _, child = fqn.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
    logger.info(f"serve: {len(picked)} cuSPARSELt linears, algorithms chosen for {len(ALG_CACHE)} problem shapes")
    return [fqn for fqn, _ in picked]
