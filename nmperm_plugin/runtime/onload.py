"""Running a model whose weights live elsewhere (the CPU) on an execution device (a GPU), one decoder
layer at a time, as llm-compressor's sequential pipeline does.

Nothing here moves or changes the model: a module is called through ``functional_call`` with
copies of its parameters and buffers on the device, made for that call and freed after it (in a
recomputing backward, made again). When the module already lives on the device there is nothing to
copy and the call is the plain ``functional_call``, so a model on its execution device runs
exactly as before.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from itertools import chain

import torch
from torch import nn
from torch.func import functional_call

from .. import compat
from ..io import checks
from .sharding import is_shard, whole

__all__ = [
    "call_on",
    "execution_device",
    "fits_on",
    "head_on",
    "module_tensors",
    "moved",
    "storage_device",
    "undispatched",
]


def execution_device(device: torch.device | str | None) -> torch.device | None:
    """``device`` as a ``torch.device`` with its index (``cuda`` is the current CUDA device), so
    that it compares equal to the device of tensors placed there; None stays None."""
    if device is None:
        return None
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def fits_on(model: nn.Module, device: torch.device, share: float = 0.5) -> bool:
    """Whether ``model``'s weights take at most ``share`` of the memory ``device`` has free (the rest
    is for the learning: effective weights, activations, the optimiser), or are there already."""
    if storage_device(model) == device:
        return True
    weights = sum(t.numel() * t.element_size() for t in chain(model.parameters(), model.buffers()))
    return weights <= share * checks.available_memory(device)


def storage_device(model: nn.Module) -> torch.device:
    """Where ``model``'s weights are stored (its first parameter's device)."""
    return next(model.parameters()).device


def moved(value, device: torch.device):
    """``value`` (tensors, or tuples, lists and dicts of them: a layer's keyword arguments) on
    ``device``; anything else as it is."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {key: moved(item, device) for key, item in value.items()}
    if isinstance(value, tuple | list):
        items = [moved(item, device) for item in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)  # namedtuples too
    return value


def module_tensors(module: nn.Module, device: torch.device, skip: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """``module``'s parameters and buffers that are not on ``device`` (and not named in ``skip``),
    copied there, by name, and its sharded ones gathered whole there (:mod:`.sharding`); empty when
    the module lives on ``device`` unsharded."""
    skipped = set(skip)
    named = chain(module.named_parameters(), module.named_buffers())
    return {
        name: whole(tensor, device) if is_shard(tensor) else tensor.detach().to(device, non_blocking=True)
        for name, tensor in named
        if (tensor.device != device or is_shard(tensor)) and name not in skipped
    }


def call_on(module: nn.Module, weights: Mapping[str, torch.Tensor], args: tuple, kwargs: dict, device: torch.device):
    """``module(*args, **kwargs)`` on ``device`` with ``weights`` (parameter name -> tensor on the
    device) substituted and its other tensors onloaded for this call."""
    return functional_call(module, module_tensors(module, device, weights) | dict(weights), args, kwargs)


class _Caller(nn.Module):
    """Calls a function of a model inside ``functional_call`` (which swaps the model's tensors)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, function: Callable, *args):
        return function(*args)


def head_on(
    model: nn.Module, layers: Iterable[nn.Module], head: Callable[[torch.Tensor], torch.Tensor], device: torch.device
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``head`` (a function of ``model``'s modules after the decoder ``layers``) running on ``device``:
    every tensor of ``model`` outside ``layers`` that is not there is copied there once, for as long
    as the returned function lives (embeddings, final norm, output head: small beside the layers)."""
    inside = {id(t) for layer in layers for t in chain(layer.parameters(), layer.buffers())}
    named = chain(model.named_parameters(), model.named_buffers())
    onloaded = {
        f"model.{name}": tensor.detach().to(device)
        for name, tensor in named
        if id(tensor) not in inside and tensor.device != device
    }
    if not onloaded:
        return head
    caller = _Caller(model)
    return lambda hidden: functional_call(caller, onloaded, (head, hidden))


def _offload_caches(model: nn.Module) -> list:
    from compressed_tensors.offload.cache import OffloadCache  # llm-compressor's offloading

    stores = (compat.parameter_store(m) for m in model.modules())
    return [store for store in stores if isinstance(store, OffloadCache)]


class undispatched:
    """Inside the block, a model dispatched with llm-compressor's offloading (``compressed_tensors``
    ``OffloadCache``: weights kept on the CPU and onloaded by each module's forward) holds plain
    tensors on its offload device, so that :mod:`nmperm_plugin` can read, onload and change them;
    on exit it is dispatched again with the same onload device. A model that is not dispatched is
    left as it is. Weights offloaded to disk are refused (load the model to the CPU instead)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        caches = _offload_caches(model)
        devices = {str(cache.offload_device) for cache in caches}
        if "disk" in devices:
            raise ValueError(
                "the model's weights are offloaded to disk: LearnedPermutationModifier reads and changes every "
                "weight, so load the model to the CPU (from_pretrained without a disk offload) and let it onload the "
                "layers to the GPU one at a time"
            )
        self.onload_device = caches[0].onload_device if caches else None

    def __enter__(self) -> torch.device | None:
        """The onload device the model was dispatched with (None: it was not dispatched)."""
        if self.onload_device is not None:
            from compressed_tensors.offload import remove_dispatch

            remove_dispatch(self.model)
        return self.onload_device

    def __exit__(self, *exc) -> None:
        if self.onload_device is not None:
            from compressed_tensors.offload import set_onload_device

            set_onload_device(self.model, self.onload_device)
