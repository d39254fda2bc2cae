"""Serving a 2:4 model without the per-call host floor: cuSPARSELt algorithm chosen once per shape, CUDA graphs.

Measured on an H200 (docs/export.md): every eager 2:4 bf16 call through a ``SparseSemiStructuredTensor``
costs at least 0.46 ms whatever the shape, because PyTorch's ``_cslt_sparse_mm`` rebuilds its cuSPARSELt
descriptors, plan and workspace on every call and the tensor subclass adds Python dispatch. This module
removes that host work from the serving loop:

1. :class:`~.cusparselt.CusparseltLinear` holds the weight compressed once (``torch._cslt_compress``)
   and calls ``torch._cslt_sparse_mm`` directly with the transposed-result fusion (the output comes out as
   ``[tokens, out_features]`` with no extra transpose), with an algorithm id chosen once per
   (shape, token count) by timing every cuSPARSELt algorithm (``tune="time"``) or by cuSPARSELt's own search
   (``tune="search"``), cached for every layer of the same shape.
2. :func:`serve` captures the model's forward for each input shape in a ``torch.cuda.CUDAGraph`` (or
   ``torch.compile(mode="reduce-overhead")``), so a call is one graph replay: the per-call descriptor and
   plan set-up ran once, at capture.

Everything here needs a CUDA GPU (SM 8.0+, torch built with cuSPARSELt); on CPU each entry point refuses
with a message saying so. The private ``torch._cslt_*`` ops are reached through :mod:`nmperm_plugin.compat`.
"""

from __future__ import annotations

import inspect
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from loguru import logger
from torch import nn

from .cusparselt import (
    ALG_CACHE,
    TUNE_METHODS,
    ServeError,
    is_cusparselt_weight,
    prepare_linears_,
    require_cuda,
)

SERVE_MODES = ("cuda_graph", "compile")


def parse_shape(shape: str | Sequence[int]) -> tuple[int, int]:
    """``"4x2048"`` or ``(4, 2048)`` -> ``(batch, tokens)``, both positive."""
    if isinstance(shape, str):
        parts = shape.lower().split("x")
        if len(parts) != 2 or not all(part.strip().isdigit() for part in parts):
            raise ValueError(f"input shape {shape!r} is not BATCHxTOKENS (e.g. 4x2048)")
        shape = tuple(int(part) for part in parts)
    shape = tuple(shape)
    if len(shape) != 2 or not all(isinstance(n, int) and not isinstance(n, bool) for n in shape):
        raise ValueError(f"input shape {shape!r} must be two ints (batch, tokens)")
    if min(shape) < 1:
        raise ValueError(f"input shape {shape!r}: batch and tokens must be at least 1")
    return shape


@dataclass(frozen=True)
class ServeConfig:
    """What :func:`serve` prepares.

    Attributes:
        shapes: the ``(batch, tokens)`` input shapes to capture (strings ``"4x2048"`` are accepted); a call
            with another shape runs eagerly, with a warning.
        mode: ``"cuda_graph"`` (one ``torch.cuda.CUDAGraph`` per shape) or ``"compile"``
            (``torch.compile(mode="reduce-overhead")``, which also captures CUDA graphs).
        tune: how each cuSPARSELt layer's algorithm id is chosen, once per (shape, token count): ``"time"``
            every id, ``"search"`` cuSPARSELt's own search, ``"off"`` the library default (0).
        logits_to_keep: keep the logits of the last N positions only (0: all), for models whose forward
            accepts ``logits_to_keep`` (transformers causal LMs).
        warmup: eager calls before each capture (lazy initialisation must not happen inside a graph).
        tune_repeats: timed calls per candidate algorithm.
    """

    shapes: tuple[tuple[int, int], ...] = ((1, 2048),)
    mode: str = "cuda_graph"
    tune: str = "time"
    logits_to_keep: int = 1
    warmup: int = 3
    tune_repeats: int = 10

    def __post_init__(self) -> None:
        if isinstance(self.shapes, str) or not isinstance(self.shapes, Iterable):
            raise ValueError(f"shapes must be a list of (batch, tokens) shapes, got {self.shapes!r}")
        shapes = tuple(dict.fromkeys(parse_shape(shape) for shape in self.shapes))
        if not shapes:
            raise ValueError("shapes is empty: give at least one (batch, tokens) input shape to capture")
        object.__setattr__(self, "shapes", shapes)
        if self.mode not in SERVE_MODES:
            raise ValueError(f"unknown serve mode {self.mode!r}: choose one of {', '.join(SERVE_MODES)}")
        if self.tune not in TUNE_METHODS:
            raise ValueError(f"unknown tune method {self.tune!r}: choose one of {', '.join(TUNE_METHODS)}")
        for name in ("logits_to_keep", "warmup", "tune_repeats"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "tune_repeats" else 0):
                raise ValueError(f"{name} must be an int >= {1 if name == 'tune_repeats' else 0}, got {value!r}")

    @property
    def token_counts(self) -> list[int]:
        """Rows each linear sees per captured shape (batch x tokens), deduplicated, largest first."""
        return sorted({batch * tokens for batch, tokens in self.shapes}, reverse=True)


class GraphRunner:
    """One CUDA-graph capture of ``fn(*inputs)`` for fixed input shapes; ``__call__`` copies in and replays.

    The output tensor is the graph's own buffer, overwritten by the next replay (``__call__`` returns a clone).
    """

    def __init__(self, fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], warmup: int = 3, pool=None):
        require_cuda("GraphRunner")
        self.inputs = [tensor.clone() for tensor in inputs]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(warmup):
                fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool), torch.inference_mode():
            self.output = fn(*self.inputs)

    def replay(self, *inputs: torch.Tensor) -> torch.Tensor:
        """Copy ``inputs`` into the captured buffers, replay, return the captured output buffer (no copy)."""
        for static, tensor in zip(self.inputs, inputs, strict=True):
            if static.shape != tensor.shape:
                raise ServeError(f"input shape {tuple(tensor.shape)} differs from the captured {tuple(static.shape)}")
            static.copy_(tensor)
        self.graph.replay()
        return self.output

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.replay(*inputs).clone()


def logits_forward(model: nn.Module, logits_to_keep: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``input_ids -> logits`` for ``model``: a transformers causal LM without KV cache, or any module."""
    parameters = inspect.signature(model.forward).parameters
    kwargs: dict = {}
    if "use_cache" in parameters:
        kwargs["use_cache"] = False
    if "logits_to_keep" in parameters and logits_to_keep:
        kwargs["logits_to_keep"] = logits_to_keep

    def forward(input_ids: torch.Tensor) -> torch.Tensor:
        out = model(input_ids=input_ids, **kwargs) if "input_ids" in parameters else model(input_ids)
        return out.logits if hasattr(out, "logits") else out

    return forward


@dataclass
class ServedModel:
    """A model prepared by :func:`serve`: call it with ``input_ids`` of a captured shape to get logits."""

    model: nn.Module
    config: ServeConfig
    forward: Callable[[torch.Tensor], torch.Tensor]
    runners: dict[tuple[int, int], Callable[[torch.Tensor], torch.Tensor]] = field(default_factory=dict)
    cusparselt_layers: list[str] = field(default_factory=list)
    _warned: set = field(default_factory=set)

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits for ``input_ids [batch, tokens]``: one graph replay for a captured shape, else eager."""
        shape = tuple(input_ids.shape)
        runner = self.runners.get(shape)
        if runner is None:
            if shape not in self._warned:
                self._warned.add(shape)
                captured = ", ".join(f"{b}x{t}" for b, t in self.runners)
                logger.warning(f"serve: input shape {shape[0]}x{shape[-1]} was not captured ({captured}): eager")
            return self.forward(input_ids)
        return runner(input_ids)

    def describe(self) -> dict:
        """What was prepared: mode, captured shapes, cuSPARSELt layers and the algorithm ids chosen."""
        algs = {key: alg for key, alg in ALG_CACHE.items()}
        return {
            "mode": self.config.mode,
            "shapes": [list(shape) for shape in self.runners],
            "cusparselt_layers": len(self.cusparselt_layers),
            "alg_ids": {"x".join(str(part) for part in key): alg for key, alg in algs.items()},
        }


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU when it has neither)."""
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


def serve(model: nn.Module, config: ServeConfig | None = None, vocab_size: int | None = None) -> ServedModel:
    """Prepare a converted 2:4 model for serving without the per-call floor; returns a callable :class:`ServedModel`.

    The cuSPARSELt layers (weights made by ``sparsify_``/``to_torchao_``) become tuned :class:`CusparseltLinear`
    layers (unless ``config.tune == "off"``), then the forward is captured for every ``config.shapes`` in a
    CUDA graph (``mode="cuda_graph"``) or compiled with ``torch.compile(mode="reduce-overhead")``. FP8 2:4 and
    CUTLASS layers stay as they are and are captured too. ``vocab_size`` bounds the random token ids used for
    capture (default: ``model.config.vocab_size``, else 2). Raises :class:`ServeError` without a CUDA GPU or when
    the model is not on it.
    """
    config = config or ServeConfig()
    device = require_cuda("serve()")
    if model_device(model).type != "cuda":
        raise ServeError("serve() needs the model on the CUDA GPU: call model.cuda() (export_checkpoint already does)")
    swapped: list[str] = []
    if config.tune != "off" and any(is_cusparselt_weight(m, n) for n, m in model.named_modules()):
        swapped = prepare_linears_(model, config.token_counts, config.tune, config.tune_repeats)
    forward = logits_forward(model.eval(), config.logits_to_keep)
    served = ServedModel(model=model, config=config, forward=forward, cusparselt_layers=swapped)
    vocab = vocab_size or getattr(getattr(model, "config", None), "vocab_size", None) or 2
    # the largest shape first, so the smaller graphs reuse its memory pool
    shapes = sorted(config.shapes, key=lambda shape: shape[0] * shape[1], reverse=True)
    pool = torch.cuda.graph_pool_handle() if config.mode == "cuda_graph" else None
    compiled = torch.compile(forward, mode="reduce-overhead", dynamic=False) if config.mode == "compile" else None
    for batch, tokens in shapes:
        ids = torch.randint(0, vocab, (batch, tokens), device=device)
        if compiled is not None:
            with torch.inference_mode():
                for _ in range(max(config.warmup, 2)):
                    compiled(ids)
            served.runners[(batch, tokens)] = lambda x, fn=compiled: fn(x).clone()
        else:
            served.runners[(batch, tokens)] = GraphRunner(forward, [ids], warmup=config.warmup, pool=pool)
        logger.info(f"serve: captured {batch}x{tokens} ({config.mode})")
    return served


def median_cuda_ms(fn: Callable[[], object], repeats: int, warmup: int = 0) -> float:
    """Median wall time of ``fn`` on the GPU in milliseconds (CUDA events, after ``warmup`` calls)."""
    for _ in range(warmup):
        fn()
    if warmup:
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


@torch.inference_mode()
def check_served(served: ServedModel, repeats: int = 10, seed: int = 0) -> list[dict]:
    """For every captured shape: the served logits against the eager forward's, and both median latencies.

    Rows hold ``shape``, ``rel_err`` (relative L2 error), ``eager_ms``, ``served_ms`` and ``speedup``.
    """
    require_cuda("check_served")
    vocab = getattr(getattr(served.model, "config", None), "vocab_size", None) or 2
    generator = torch.Generator(device="cuda").manual_seed(seed)
    rows = []
    for batch, tokens in served.runners:
        ids = torch.randint(0, vocab, (batch, tokens), device="cuda", generator=generator)
        expected, actual = served.forward(ids).float(), served(ids).float()
        error = float((actual - expected).norm() / expected.norm().clamp_min(1e-12))
        eager_ms = median_cuda_ms(lambda i=ids: served.forward(i), repeats)
        served_ms = median_cuda_ms(lambda i=ids: served(i), repeats)
        rows.append(
            {
                "shape": f"{batch}x{tokens}",
                "rel_err": error,
                "eager_ms": eager_ms,
                "served_ms": served_ms,
                "speedup": eager_ms / served_ms,
            }
        )
    return rows
