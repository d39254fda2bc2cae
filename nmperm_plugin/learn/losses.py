"""Data-driven objectives (SPEC 2): layer-wise reconstruction and the end-to-end loss (model or window)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import compat
from ..arch.base import TokenHead, kl_distillation, next_token_cross_entropy
from ..runtime import distributed
from ..runtime.onload import call_on
from .learner import LazyWeights, Objective


def first(output):
    """A decoder layer's hidden states, whether it returns a tensor or a tuple."""
    return output[0] if isinstance(output, tuple) else output


class EpochBatches:
    """The sequence indices of each learning step: the ``count`` sequences in a new random order every
    epoch, ``per_step`` at a time, so each is seen once per pass (not drawn with replacement across
    steps). Epoch ``e``'s order depends only on a seed drawn from ``generator`` at construction and on
    ``e``, so step ``s``'s batch needs no state: a resumed run draws what the interrupted one would."""

    def __init__(self, count: int, per_step: int, generator: torch.Generator) -> None:
        self.count, self.per_step = count, min(per_step, count)
        self.seed = int(torch.randint(2**62, (), generator=generator))
        self._orders: dict[int, torch.Tensor] = {}

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._orders:  # keep the last one only
            rng = torch.Generator().manual_seed(self.seed + epoch)
            self._orders = {epoch: torch.randperm(self.count, generator=rng)}
        return self._orders[epoch]

    def __call__(self, step: int) -> torch.Tensor:
        """The ``per_step`` indices of step ``step`` (from 0)."""
        positions = range(step * self.per_step, (step + 1) * self.per_step)
        return torch.stack([self._order(p // self.count)[p % self.count] for p in positions])


class LayerwiseObjective(Objective):
    """Match one decoder layer's output to the dense model's output at that layer.

    ``inputs`` come from the already pruned (and permuted) earlier layers, ``targets`` from the dense
    model, so the loss sees how errors compound. The next ``per_step`` sequences of a shuffled pass
    drive each step (:class:`EpochBatches`); a fixed subset of ``select_count`` sequences ranks the
    hard permutations."""

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
        self.batches, self.generator = EpochBatches(len(inputs), per_step, generator), generator
        self.select_index = torch.arange(min(select_count, len(inputs)))
        self.scale = targets.square().mean()
        distributed.check_shares(self.batches.per_step)

    def _error(self, weights: Mapping[str, torch.Tensor], index: torch.Tensor) -> torch.Tensor:
        inputs = self.inputs[index]
        output = first(call_on(self.layer, weights, (inputs,), self.kwargs, inputs.device))
        return (output - self.targets[index]).square().mean() / self.scale

    def loss(self, weights: Mapping[str, torch.Tensor], step: int) -> torch.Tensor:
        index = self.batches(step)
        mine = distributed.share(index)
        return self._error(weights, mine) * (len(mine) / len(index))  # ranks' gradients are summed (learn)

    @torch.no_grad()
    def select(self, weights: Mapping[str, torch.Tensor]) -> float:
        chunks = distributed.share(self.select_index).split(self.batches.per_step)
        total = sum(float(self._error(weights, c)) * len(c) for c in chunks)
        return distributed.sum_float(total) / len(self.select_index)


class JointLayerwiseObjective(Objective):
    """Layer-wise reconstruction over many decoder layers at once, for a site they all share
    (``fold: exact``'s global ``hidden`` permutation): each step draws ``layers_per_step`` layers and
    ``per_step`` sequences, runs each layer on its dense input and matches its dense output."""

    def __init__(
        self,
        layers: list[tuple[str, nn.Module]],  # (name prefix, layer)
        layer_kwargs: list[dict],  # per layer
        inputs: list[torch.Tensor],  # per layer [N, T, D]
        targets: list[torch.Tensor],  # per layer [N, T, D]
        params: list[list[str]],  # per layer: the full parameter names this objective replaces
        per_step: int,
        layers_per_step: int,
        select_count: int,
        generator: torch.Generator,
    ) -> None:
        self.layers, self.kwargs, self.inputs, self.targets, self.params = layers, layer_kwargs, inputs, targets, params
        self.layers_per_step, self.generator = layers_per_step, generator
        self.batches = EpochBatches(len(inputs[0]), per_step, generator)
        self.select_index = torch.arange(min(select_count, len(inputs[0])))
        self.scales = [t.square().mean() for t in targets]
        distributed.check_shares(self.batches.per_step)

    def _error(self, weights: Mapping[str, torch.Tensor], layer: int, index: torch.Tensor) -> torch.Tensor:
        prefix, module = self.layers[layer]
        mine = {name[len(prefix) :]: weights[name] for name in self.params[layer]}
        inputs = self.inputs[layer][index]
        output = first(call_on(module, mine, (inputs,), self.kwargs[layer], inputs.device))
        return (output - self.targets[layer][index]).square().mean() / self.scales[layer]

    def loss(self, weights: Mapping[str, torch.Tensor], step: int) -> torch.Tensor:
        chosen = torch.randperm(len(self.layers), generator=self.generator)[: self.layers_per_step]
        index = self.batches(step)
        mine = distributed.share(index)
        error = sum(self._error(weights, int(layer), mine) for layer in chosen) / len(chosen)
        return error * (len(mine) / len(index))  # ranks' gradients are summed (learn)

    @torch.no_grad()
    def select(self, weights: Mapping[str, torch.Tensor]) -> float:
        mine = distributed.share(self.select_index)
        total = sum(float(self._error(weights, layer, mine)) * len(mine) for layer in range(len(self.layers)))
        return distributed.sum_float(total) / (len(self.layers) * len(self.select_index))


def fast_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices much faster than float32: a CUDA GPU with
    bfloat16, or a CPU with AMX tiles."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and compat.amx_tile_supported()


def training_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of learning passes for ``name`` in :data:`~nmperm_plugin.config.TRAIN_DTYPES` (None: float32).
    ``auto``: bfloat16 where it is fast."""
    if name == "bfloat16" or (name == "auto" and fast_bfloat16(device)):
        return torch.bfloat16
    return None


def layer_checkpointing(config_value: str, device: torch.device) -> bool:
    """Whether to recompute each decoder layer in backward (``on``/``off``; ``auto``: on a GPU,
    where memory binds, not on a CPU, where it would cost a third more time for memory it has)."""
    return config_value == "on" or (config_value == "auto" and device.type == "cuda")


class KeptTargets:
    """The dense model's outputs of a window's layers for every calibration sequence (``[N, T, D]``
    each, kept on any device, e.g. the CPU); called with a step's sequence indices, their rows."""

    def __init__(self, outputs: list[torch.Tensor]) -> None:
        self.outputs = outputs

    def __len__(self) -> int:
        return len(self.outputs)

    def __call__(self, index: torch.Tensor) -> list[torch.Tensor]:
        return [output[index] for output in self.outputs]


class RecomputedTargets:
    """The dense outputs of a window's ``layers`` computed for each step's sequences from the window's
    dense ``inputs`` (``[N, T, D]``, any device): one dense forward of the window per step instead of
    ``N x layers x T x D`` kept values; the same numbers as :class:`KeptTargets` up to the batch's
    rounding."""

    def __init__(self, layers: list[nn.Module], kwargs: list[dict], inputs: torch.Tensor, device: torch.device) -> None:
        self.layers, self.kwargs, self.inputs, self.device = layers, kwargs, inputs, device

    def __len__(self) -> int:
        return len(self.layers)

    @torch.no_grad()
    def __call__(self, index: torch.Tensor) -> list[torch.Tensor]:
        hidden, outputs = self.inputs[index].to(self.device), []
        for layer, kwargs in zip(self.layers, self.kwargs, strict=True):
            hidden = first(call_on(layer, {}, (hidden,), kwargs, self.device))
            outputs.append(hidden)
        return outputs


@dataclass
class LayerStack:
    """A model run one block at a time: the layers, their parameter-name prefixes (``model.layers.3.``),
    each layer's keyword arguments (position embeddings, mask), ``head`` (last hidden state ``[B, T, D]``
    -> an LM's logits ``[B, T, V]``, a classifier's ``[B, C]``), ``loss`` (output, labels -> the task's
    loss: the adapter's ``task_loss``), ``distill`` (pruned, dense output -> the task term without labels:
    the adapter's ``output_distillation``) and ``token_head`` (the adapter's, or None: the head and those
    two losses by chunks of positions, the ``[B, T, V]`` logits never whole)."""

    layers: list[nn.Module]
    prefixes: list[str]
    kwargs: list[dict]
    head: Callable[[torch.Tensor], torch.Tensor]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = next_token_cross_entropy
    distill: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = kl_distillation
    token_head: TokenHead | None = None


class WindowObjective(Objective):
    """The paper's loss on decoder layers ``[start, stop)`` (all of them: ``end_to_end``).

    The window runs on ``inputs`` (``[N, T, D]``: the output of the already pruned earlier layers,
    or the embeddings), one decoder layer at a time. Loss: the smooth-L1 distance of each layer's
    output to the dense model's (``targets``: kept, ``[N, T, D]`` per layer on any device, or
    :class:`RecomputedTargets` computed for each step's sequences), plus, when the window ends at
    the last layer, the task term: the model's loss on ``labels`` (``[N, ...]``,
    ``stack.loss``: the next token of a causal LM, the class of a classifier), or without labels the
    distance to the dense model's output (``stack.distill``: a KL divergence of logits); ``loss = task +
    alpha * distillation``, a window before the end has only the distillation. ``select`` ranks hard
    permutations by the task term (the distillation before the end), in the model's precision.

    Memory: an effective weight exists only while its layer runs; with ``checkpoint`` each layer is
    recomputed in backward (``torch.utils.checkpoint``), so a step keeps only the layer-boundary
    activations of its sequences. A step's sequences are split across ``torch.distributed`` ranks.
    """

    def __init__(
        self,
        stack: LayerStack,
        window: range,
        inputs: torch.Tensor,  # [N, T, D]
        targets: list[torch.Tensor] | KeptTargets | RecomputedTargets,  # per layer of the window, [N, T, D]
        labels: torch.Tensor | None,  # [N, ...]: token ids of a causal LM, class indices, or None
        alpha: float,
        per_step: int,
        select_count: int,
        generator: torch.Generator,
        autocast: torch.dtype | None = None,
        checkpoint: bool = False,
    ) -> None:
        if len(targets) != len(window):
            raise ValueError(f"{len(targets)} dense targets for a window of {len(window)} layers")
        self.targets = KeptTargets(targets) if isinstance(targets, list) else targets
        self.stack, self.window, self.inputs, self.labels = stack, window, inputs, labels
        self.alpha, self.autocast, self.checkpoint = alpha, autocast, checkpoint
        self.batches, self.generator = EpochBatches(len(inputs), per_step, generator), generator
        self.select_index = torch.arange(min(select_count, len(inputs)))
        self.device = inputs.device if labels is None else labels.device
        self.ends_model = window.stop == len(stack.layers)
        distributed.check_shares(self.batches.per_step)

    def _layer(self, index: int, weights: LazyWeights, hidden: torch.Tensor) -> torch.Tensor:
        prefix = self.stack.prefixes[index]
        mine = {name[len(prefix) :]: weights.compute(name) for name in weights if name.startswith(prefix)}
        return first(call_on(self.stack.layers[index], mine, (hidden,), self.stack.kwargs[index], hidden.device))

    def _terms(self, weights: LazyWeights, index: torch.Tensor, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(task term or 0, summed distillation) of the sequences ``index``."""
        targets = self.targets(index)  # in the model's precision, outside the learning pass's autocast
        autocast = self.autocast if train else None  # select ranks in the model's precision
        with torch.autocast(self.device.type, autocast) if autocast else contextlib.nullcontext():
            return self._window_terms(weights, index, targets, train)

    def _window_terms(self, weights: LazyWeights, index: torch.Tensor, targets: list[torch.Tensor], train: bool):
        hidden = self.inputs[index].to(self.device)
        distill = torch.zeros((), device=self.device)
        for layer in self.window:
            run = partial(self._layer, layer, weights)
            hidden = checkpoint(run, hidden, use_reentrant=False) if train and self.checkpoint else run(hidden)
            target = targets[layer - self.window.start].to(self.device)
            distill = distill + F.smooth_l1_loss(hidden.float(), target.float())
        if not self.ends_model:
            return torch.zeros((), device=self.device), distill
        labels = None if self.labels is None else self.labels[index]
        if self.stack.token_head is not None:  # by chunks of positions; target: the dense last layer's output
            return self.stack.token_head.task(hidden, labels, target), distill
        output = self.stack.head(hidden)
        if labels is not None:
            return self.stack.loss(output, labels), distill
        with torch.no_grad():
            dense = self.stack.head(target)  # target: the dense last layer's output
        return self.stack.distill(output, dense), distill

    def loss(self, weights: Mapping[str, torch.Tensor], step: int) -> torch.Tensor:
        index = self.batches(step)
        mine = distributed.share(index)
        cross_entropy, distill = self._terms(weights, mine, train=True)
        loss = cross_entropy + self.alpha * distill if self.ends_model else distill
        return loss * (len(mine) / len(index))  # ranks' gradients are summed (learn)

    @torch.no_grad()
    def select(self, weights: Mapping[str, torch.Tensor]) -> float:
        total = 0.0
        for chunk in distributed.share(self.select_index).split(self.batches.per_step):
            cross_entropy, distill = self._terms(weights, chunk, train=False)
            total += float(cross_entropy if self.ends_model else distill) * len(chunk)
        return distributed.sum_float(total) / len(self.select_index)
