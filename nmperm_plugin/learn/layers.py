"""Running a model's decoder layers one at a time: the first layer's inputs and every layer's
keyword arguments captured from a forward pass, one layer run with substituted (masked) weights,
and the calibration statistics a layer's linears see. Used by :class:`~.run.Run`."""

from __future__ import annotations

import inspect
from functools import partial

import torch
from torch import nn

from ..compat import tensor_version
from ..core.scores import ChannelStats, check_finite_stats
from ..data.calibration import samples_of
from ..runtime.onload import call_on
from .losses import first


class _Stop(Exception):
    pass


def _keyword_arguments(module: nn.Module, args: tuple, kwargs: dict) -> dict:
    """A layer call's arguments after its hidden states, by name (positional ones too, e.g. a ViT
    layer's ``attention_mask``), without the cache; ``use_cache`` (decoders) set to False."""
    names = list(inspect.signature(module.forward).parameters)[1:]
    kept = dict(zip(names, args[1:], strict=False)) | kwargs
    kept = {k: v for k, v in kept.items() if k not in ("hidden_states", "past_key_values")}
    return kept | {"use_cache": False} if "use_cache" in kept else kept


def capture_layer_inputs(
    model: nn.Module, layers: nn.ModuleList, calibration: torch.Tensor | list[dict]
) -> tuple[torch.Tensor, list[dict]]:
    """The first decoder layer's input for every sample (``[N, T, D]``) and each decoder layer's
    keyword arguments (attention mask, position embeddings: layers of different types get different
    ones, e.g. Gemma's sliding-window and global layers), taken from the first sample.

    ``calibration``: token ids ``[N, T]``, or each sample's model inputs (:attr:`Run.samples`: the
    adapter's :meth:`~nmperm_plugin.arch.base.Adapter.model_inputs`, batch dimension 1)."""
    samples = samples_of(calibration) if isinstance(calibration, torch.Tensor) else calibration
    hidden: list[torch.Tensor] = []
    layer_kwargs: list[dict | None] = [None] * len(layers)

    def hook(index, module, args, kwargs):
        if index == 0:
            hidden.append(args[0] if args else kwargs["hidden_states"])
        if layer_kwargs[index] is None:
            layer_kwargs[index] = _keyword_arguments(module, args, kwargs)
        if index + 1 == len(layers) or layer_kwargs[index + 1] is not None:
            raise _Stop

    handles = [layer.register_forward_pre_hook(partial(hook, i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            for sample in samples:
                try:
                    model(**sample)
                except _Stop:
                    pass
    finally:
        for handle in handles:
            handle.remove()
    return torch.cat(hidden), layer_kwargs


@torch.no_grad()
def run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict, weights: dict | None = None) -> torch.Tensor:
    """``layer``'s output for ``hidden`` (``[N, T, D]``, 4 sequences at a time), with ``weights``
    (parameter name -> tensor) substituted when given."""
    weights = weights or {}
    return torch.cat([first(call_on(layer, weights, (h,), kwargs, h.device)) for h in hidden.split(4)])


@torch.no_grad()
def collect_stats(
    layer: nn.Module, names: dict[str, nn.Linear], hidden: torch.Tensor, kwargs: dict, hessian: bool
) -> tuple[dict[str, ChannelStats], torch.Tensor]:
    """Input statistics of the named linears of ``layer`` over ``hidden``, and the layer's output
    (the same forward: a dense pass runs each layer once). Linears fed the very same input tensor
    (q/k/v, gate/up) share one ChannelStats, accumulated once: the Hessian is most of the cost."""
    stats: dict[str, ChannelStats] = {}
    shared: set[str] = set()  # linears whose stats are an earlier linear's
    last: list = [None, None, None]  # the latest input a named linear saw, its version, that linear

    def same_as_last(x: torch.Tensor) -> bool:  # the very tensor, not changed in place since
        return x is last[0] and tensor_version(x) == last[1]

    def record(name: str, x: torch.Tensor) -> None:
        if name in shared:
            if not same_as_last(x):
                raise RuntimeError(f"{name} shared its input with the linear before it on the first batch only")
            return
        if name not in stats:
            if same_as_last(x):  # the same statistics as the linear before it
                stats[name] = stats[last[2]]
                shared.add(name)
                return
            stats[name] = ChannelStats.empty(names[name].in_features, hessian, hidden.device)
        stats[name].update(x)
        last[:] = [x, tensor_version(x), name]

    handles = [
        lin.register_forward_hook(lambda mod, args, out, n=name: record(n, args[0])) for name, lin in names.items()
    ]
    try:
        output = run_layer(layer, hidden, kwargs)
    finally:
        for handle in handles:
            handle.remove()
        last[:] = [None, None, None]
    for name, lin in names.items():  # a linear the forward never called (an expert no token chose)
        stats.setdefault(name, ChannelStats.empty(lin.in_features, hessian, hidden.device))
    check_finite_stats(stats)  # NaN/inf inputs: an error naming the linear, before any solver sees them
    return stats, output
