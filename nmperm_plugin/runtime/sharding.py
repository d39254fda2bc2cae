"""Layer-sharded learning (``shard_weights``): each ``torch.distributed`` rank keeps only its part of
every frozen decoder-layer matrix and of its saliency scores; a layer's whole tensors are
all-gathered where it runs, in forward and again in a checkpointed backward's recomputation, and
freed after the call. Data parallelism is unchanged: every rank takes its share of each step's
sequences and the cost matrices' gradients are summed (:mod:`.distributed`).

A shard is the rank's contiguous slice of the flattened tensor, padded to ``ceil(numel / ranks)``
so that every rank's slice has the same length, and marked with the whole tensor's shape. A sharded
parameter keeps its ``nn.Parameter`` object (its ``.data`` is the slice), so module code that reads
it goes through :func:`whole` (``runtime.onload.module_tensors`` does for every layer call).

Why not FSDP2 (``fully_shard``): it runs on CPU and gloo in the installed torch, but its pre-forward
hook puts the gathered parameters back on the module, overriding the effective weights
``W * mask(S, perm)`` that ``functional_call`` substitutes (checked: the layer computes with the
dense ``W``); it shards parameters only, not the scores beside them; and its gradient
reduce-scatter has nothing to do here (the weights are frozen). See docs/distributed.md.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from ..arch import Adapter
from . import distributed

_SHAPE = "_nmperm_whole_shape"  # attribute marking a shard with its whole tensor's shape
# all_gather_single where torch has it (torch 2.13 deprecates all_gather_into_tensor for it), else the older name
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def is_shard(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is this rank's part of a sharded tensor (:func:`shard_of`, :func:`shard_layers_`)."""
    return getattr(tensor, _SHAPE, None) is not None


def _slice(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's slice of ``tensor`` flattened, zero-padded to ``ceil(numel / ranks)`` (a new tensor)."""
    flat = tensor.detach().reshape(-1)
    size = -(-flat.numel() // distributed.world_size())
    start = min(distributed.rank() * size, flat.numel())
    part = flat[start : start + size]
    local = torch.zeros(size, dtype=flat.dtype, device=flat.device)
    local[: part.numel()] = part
    return local


def shard_of(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``tensor`` (whole on every rank), marked as a shard; :func:`whole` gathers it."""
    local = _slice(tensor)
    setattr(local, _SHAPE, tensor.shape)
    return local


def part_of(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``tensor`` (a whole one, e.g. a mask) cut as ``like`` is: this rank's slice when ``like`` is a
    shard of a tensor of the same shape, else ``tensor`` itself."""
    if not is_shard(like):
        return tensor
    if tensor.shape != getattr(like, _SHAPE):
        raise ValueError(f"a tensor of shape {tuple(tensor.shape)} cut as a shard of {tuple(getattr(like, _SHAPE))}")
    return _slice(tensor.to(like.device))


def _collective_device() -> torch.device:
    """Where a gather runs: the current CUDA device under NCCL (shards kept on the CPU are copied
    there, 1/ranks of a layer each), else the CPU (gloo)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def whole(tensor: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """``tensor`` whole on ``device`` (None: where it is): a shard gathered from every rank (a
    collective: every rank must call it for the same tensors in the same order), any other tensor
    as it is, copied there."""
    shape = getattr(tensor, _SHAPE, None)
    if shape is None:
        return tensor if device is None or tensor.device == device else tensor.to(device)
    target = tensor.device if device is None else device
    comm = _collective_device()
    local = tensor.detach().to(comm)
    gathered = torch.empty(local.numel() * distributed.world_size(), dtype=local.dtype, device=comm)
    _all_gather(gathered, local)
    return gathered[: shape.numel()].view(shape).to(target)


def shard_layers_(layers: Iterable[nn.Module]) -> list[nn.Parameter]:
    """Shard, in place, every parameter of ``layers`` with two or more dimensions (the matrices:
    norms and biases, tiny, stay whole); returns the parameters sharded. Their whole data is freed
    unless something else holds it."""
    sharded: list[nn.Parameter] = []
    seen: set[int] = set()
    for layer in layers:
        for parameter in layer.parameters():
            if parameter.dim() < 2 or id(parameter) in seen or is_shard(parameter):
                continue
            seen.add(id(parameter))
            shape = parameter.shape
            parameter.data = _slice(parameter.data)
            setattr(parameter, _SHAPE, shape)
            sharded.append(parameter)
    return sharded


def unshard_(parameters: Iterable[nn.Parameter]) -> None:
    """Gather ``parameters`` (sharded by :func:`shard_layers_`) back whole, in place, on every rank."""
    for parameter in parameters:
        parameter.data = whole(parameter)
        delattr(parameter, _SHAPE)


class sharded:
    """Inside the block, the matrices of ``layers`` are sharded over the ranks (``enabled``; else
    nothing changes); on exit they are whole again on every rank, whatever happened inside."""

    def __init__(self, layers: Iterable[nn.Module], enabled: bool = True) -> None:
        self.layers, self.enabled = list(layers), enabled
        self.parameters: list[nn.Parameter] = []

    def __enter__(self) -> list[nn.Parameter]:
        """The parameters sharded (empty when not ``enabled``)."""
        if self.enabled:
            self.parameters = shard_layers_(self.layers)
        return self.parameters

    def __exit__(self, *exc) -> None:
        unshard_(self.parameters)
        self.parameters = []


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """The bytes of the distinct storages behind ``tensors``: what a rank actually keeps of them."""
    storages = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        storages[(storage.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


def check_setting(select_sequences: int, per_step: int, count: int, adapter: Adapter | None = None) -> None:
    """Refuse ``shard_weights`` where it cannot run, before any work: without a process group; when
    ranks would rank candidates on different numbers of batches (each batch gathers every layer, a
    collective every rank must join); for an adapter that swaps in linear views of its weights
    (``linear_form``: GPT-2's ``Conv1D``, mixture-of-experts' fused experts), whose storage is not the
    module's parameters. ``count``: the calibration sequences; ``per_step``: a step's sequences."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "shard_weights (--shard-weights) splits the decoder layers' weights over the ranks of a torch.distributed "
            "process group, and none is initialised: launch with torchrun (docs/distributed.md) or call "
            "torch.distributed.init_process_group on every rank first; in one process, leave shard_weights off"
        )
    ranks = distributed.world_size()
    select, per_step = min(select_sequences, count), min(per_step, count)
    batches = {-(-len(range(r, select, ranks)) // per_step) for r in range(ranks)}
    if select < ranks or len(batches) > 1:
        raise ValueError(
            f"shard_weights with {ranks} ranks: {select} selection sequence(s) in batches of {per_step} give the ranks "
            f"unequal numbers of batches, and each batch gathers every layer from all ranks; set select_sequences "
            f"(--select-sequences) to a multiple of {ranks} (at most the {count} calibration sequences)"
        )
    if adapter is not None and type(adapter).linear_form is not Adapter.linear_form:
        raise ValueError(
            f"shard_weights: the {adapter.name} adapter swaps in linear views of weights stored in another layout "
            "(linear_form), which sharding does not handle; run this model without shard_weights"
        )
