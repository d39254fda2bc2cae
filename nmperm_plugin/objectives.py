"""Data-driven objectives (SPEC 2): sequential layer-wise reconstruction and the paper's end-to-end loss."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from . import compat
from .learn import Objective


def first(output):
    """A decoder layer's hidden states, whether it returns a tensor or a tuple."""
    return output[0] if isinstance(output, tuple) else output


class LayerwiseObjective(Objective):
    """Match one decoder layer's output to the dense model's output at that layer.

    ``inputs`` come from the already pruned (and permuted) earlier layers, ``targets`` from the dense
    model, so the loss sees how errors compound. A random subset of ``per_step`` sequences drives
    each step; a fixed subset of ``select_count`` sequences ranks the hard permutations.
    """

    def __init__(
        self,
        layer: nn.Module,
        layer_kwargs: dict,
        inputs: torch.Tensor,  # [N, T, D]
        targets: torch.Tensor,  # [N, T, D]
        per_step: int,
        select_count: int,
        generator: torch.Generator,
    ) -> None:
        self.layer, self.kwargs = layer, layer_kwargs
        self.inputs, self.targets = inputs, targets
        self.per_step, self.generator = min(per_step, len(inputs)), generator
        self.select_index = torch.arange(min(select_count, len(inputs)))
        self.scale = targets.square().mean()

    def _error(self, weights: Mapping[str, torch.Tensor], index: torch.Tensor) -> torch.Tensor:
        output = first(functional_call(self.layer, dict(weights), (self.inputs[index],), self.kwargs))
        return (output - self.targets[index]).square().mean() / self.scale

    def loss(self, weights: Mapping[str, torch.Tensor], step: int) -> torch.Tensor:
        index = torch.randperm(len(self.inputs), generator=self.generator)[: self.per_step]
        return self._error(weights, index)

    @torch.no_grad()
    def select(self, weights: Mapping[str, torch.Tensor]) -> float:
        chunks = self.select_index.split(max(self.per_step, 1))
        return sum(float(self._error(weights, c)) * len(c) for c in chunks) / len(self.select_index)


class JointLayerwiseObjective(Objective):
    """Layer-wise reconstruction over many decoder layers at once, for a site they all share
    (``fold: exact``'s global ``hidden`` permutation): each step draws ``layers_per_step`` layers and
    ``per_step`` sequences, runs each layer on its dense input and matches its dense output."""

    def __init__(
        self,
        layers: list[tuple[str, nn.Module]],  # (name prefix, layer)
        layer_kwargs: dict,
        inputs: list[torch.Tensor],  # per layer [N, T, D]
        targets: list[torch.Tensor],  # per layer [N, T, D]
        params: list[list[str]],  # per layer: the full parameter names this objective replaces
        per_step: int,
        layers_per_step: int,
        select_count: int,
        generator: torch.Generator,
    ) -> None:
        self.layers, self.kwargs, self.inputs, self.targets, self.params = layers, layer_kwargs, inputs, targets, params
        self.per_step, self.layers_per_step, self.generator = per_step, layers_per_step, generator
        self.select_index = torch.arange(min(select_count, len(inputs[0])))
        self.scales = [t.square().mean() for t in targets]

    def _error(self, weights: Mapping[str, torch.Tensor], layer: int, index: torch.Tensor) -> torch.Tensor:
        prefix, module = self.layers[layer]
        mine = {name[len(prefix) :]: weights[name] for name in self.params[layer]}
        output = first(functional_call(module, mine, (self.inputs[layer][index],), self.kwargs))
        return (output - self.targets[layer][index]).square().mean() / self.scales[layer]

    def loss(self, weights: Mapping[str, torch.Tensor], step: int) -> torch.Tensor:
        chosen = torch.randperm(len(self.layers), generator=self.generator)[: self.layers_per_step]
        index = torch.randperm(len(self.inputs[0]), generator=self.generator)[: self.per_step]
        return sum(self._error(weights, int(layer), index) for layer in chosen) / len(chosen)

    @torch.no_grad()
    def select(self, weights: Mapping[str, torch.Tensor]) -> float:
        return sum(float(self._error(weights, layer, self.select_index)) for layer in range(len(self.layers))) / len(
            self.layers
        )


TRAIN_DTYPES = ("auto", "float32", "bfloat16")


def fast_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices much faster than float32: a CUDA GPU with
    bfloat16, or a CPU with AMX tiles."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and compat.amx_tile_supported()


def training_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of learning passes for ``name`` in :data:`TRAIN_DTYPES` (None: float32).
    ``auto``: bfloat16 where it is fast."""
    if name == "bfloat16" or (name == "auto" and fast_bfloat16(device)):
        return torch.bfloat16
    return None


class EndToEndObjective(Objective):
    """The paper's loss: cross-entropy of the pruned model plus ``alpha`` times the smooth-L1
    distance of every layer's hidden states to the dense model's (``dense_hidden[l]``: ``[N, T, D]``).

    With ``autocast`` (e.g. ``torch.bfloat16``) the learning passes run under autocast; selection
    always runs in the model's own precision, so the permutation kept is judged as it will be served.
    """

    def __init__(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,  # [N, T]
        dense_hidden: list[torch.Tensor],
        alpha: float,
        per_step: int,
        select_count: int,
        generator: torch.Generator,
        autocast: torch.dtype | None = None,
    ) -> None:
        self.model, self.input_ids, self.dense_hidden, self.alpha = model, input_ids, dense_hidden, alpha
        self.per_step, self.generator, self.autocast = min(per_step, len(input_ids)), generator, autocast
        self.select_index = torch.arange(min(select_count, len(input_ids)))

    def _forward(self, weights: Mapping[str, torch.Tensor], index: torch.Tensor, hidden: bool):
        ids = self.input_ids[index]
        kwargs = {"labels": ids, "output_hidden_states": hidden, "use_cache": False}
        return functional_call(self.model, dict(weights), (ids,), kwargs)

    def loss(self, weights: Mapping[str, torch.Tensor], step: int) -> torch.Tensor:
        index = torch.randperm(len(self.input_ids), generator=self.generator)[: self.per_step]
        device = self.input_ids.device.type
        with torch.autocast(device, self.autocast) if self.autocast else contextlib.nullcontext():
            out = self._forward(weights, index, hidden=self.alpha > 0)
        if self.alpha == 0:
            return out.loss
        distill = sum(
            F.smooth_l1_loss(h, dense[index])
            for h, dense in zip(out.hidden_states[1:], self.dense_hidden[1:], strict=True)
        )
        return out.loss + self.alpha * distill

    @torch.no_grad()
    def select(self, weights: Mapping[str, torch.Tensor]) -> float:
        chunks = self.select_index.split(max(self.per_step, 1))
        return sum(float(self._forward(weights, c, hidden=False).loss) * len(c) for c in chunks) / len(
            self.select_index
        )
