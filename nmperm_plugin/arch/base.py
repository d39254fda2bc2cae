"""Permutation sites and the adapter interface that maps a model family onto them (SPEC 3)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .head import TokenHead

FOLD_MODES = ("exact", "gather")


def next_token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """A causal LM's loss: logits ``[B, T, V]`` at each position against the next token of
    ``labels`` ``[B, T]`` (``-100`` ignored)."""
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten())


def class_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """A classifier's loss: logits ``[B, C]`` against class indices ``labels`` ``[B]``."""
    return F.cross_entropy(logits.float(), labels)


def kl_distillation(logits: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """KL divergence of the pruned model's output distribution from the dense model's (last
    dimension: classes or vocabulary), averaged over positions: the task term without labels."""
    log_p, log_q = F.log_softmax(logits.float(), -1).flatten(0, -2), F.log_softmax(dense.float(), -1).flatten(0, -2)
    return F.kl_div(log_p, log_q, log_target=True, reduction="batchmean")


def feature_distillation(features: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """Mean squared distance of the pruned model's output features to the dense model's, relative to
    their mean square: the task term without labels of a model whose output is not a distribution."""
    return (features.float() - dense.float()).square().mean() / dense.float().square().mean().clamp_min(1e-12)


@dataclass(frozen=True)
class Site:
    """A set of linear layers that read the same input tensor and so share one input permutation.

    ``tied_heads`` (exact ``attn_out`` only): the input is ``len(tied_heads)`` heads of equal size,
    permuted within each head, and head ``h`` uses the permutation of head group ``tied_heads[h]``
    (grouped-query attention: the query heads that share a value head share its permutation).
    ``fixed``: the permutation stays the identity (nothing solves or learns it), and the linears are
    pruned in their own order: a site whose input cannot be reordered, e.g. the residual stream of a
    model whose outputs are that stream (a bare CLIP vision tower).
    """

    name: str
    kind: str  # hidden | attn_in | attn_out | mlp_in | mlp_out
    linears: tuple[str, ...]
    channels: int
    layer: int | None
    tied_heads: tuple[int, ...] | None = None
    fixed: bool = False

    @property
    def head_size(self) -> int | None:
        return None if self.tied_heads is None else self.channels // len(self.tied_heads)


class Adapter:
    """How one model family exposes permutation sites and folds permutations into its weights.

    Subclasses implement :meth:`matches`, :meth:`decoder_layers`, :meth:`sites`, :meth:`fold_exact`,
    :meth:`folds_exactly` and :meth:`apply_gather` (from the tensor operations in
    :mod:`nmperm_plugin.core.ops`); register them through the ``nmperm_architectures`` hook. Decoder-only
    Transformers subclass :class:`nmperm_plugin.arch.decoder.DecoderAdapter` instead and only name
    their modules.
    """

    name: str = "base"

    def matches(self, model: nn.Module) -> bool:
        raise NotImplementedError

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        raise NotImplementedError

    def sites(self, model: nn.Module, fold: str) -> list[Site]:
        """The permutation sites of ``model`` for fold mode ``exact`` or ``gather``."""
        raise NotImplementedError

    def serving_sites(self, model: nn.Module, fold: str) -> list[Site]:
        """Every site whose permutation a checkpoint of ``model`` may record, what
        :func:`nmperm_plugin.learn.fold.apply_gather` looks a sidecar's frames up in: here :meth:`sites`. A
        model pruned part by part (a vision-language model's tower and text decoder, each a run of its
        own) lists every part's, and its :meth:`apply_gather` takes them all."""
        return self.sites(model, fold)

    def fold_exact(self, model: nn.Module, site: Site, perm: torch.Tensor) -> None:
        """Reorder the weights so the model computes the same function with ``site``'s input permuted."""
        raise NotImplementedError

    def folds_exactly(self, site: Site, fold: str) -> bool:
        """Whether ``site``'s permutation is folded into the weights in mode ``fold`` (else it stays a
        run-time gather, recorded in the sidecar's frames)."""
        raise NotImplementedError

    def apply_gather(self, model: nn.Module, site: Site, perm: torch.Tensor) -> None:
        """Realise ``perm`` with a gather at run time (``fold: gather`` sites) or fold it exactly."""
        raise NotImplementedError

    def linear_form(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """A context in which every weight a site names is an ``nn.Linear`` (weight ``[out, in]``) at
        that path: what the pipeline's statistics, masks and learned weights, the folds and
        ``nmperm verify`` work on. Here: the model as it is. A family that stores weights otherwise
        (GPT-2's ``Conv1D`` ``[in, out]``, mixture-of-experts' fused 3-D expert tensors) swaps in
        views for the duration and writes them back on exit (re-entrant: nested uses are no-ops)."""
        return contextlib.nullcontext()

    def to_linear_(self, model: nn.Module) -> nn.Module:
        """Put ``model`` in its :meth:`linear_form` for good, in place (what the torchao export converts:
        its 2:4 kernels take ``nn.Linear`` layers); the model then no longer has the family's stored
        layout, so it is for serving in memory, not for ``save_pretrained``. Here: nothing to do."""
        return model

    def checkpoint_key(self, name: str) -> str:
        """The tensor name under which a saved checkpoint stores the weight of site linear ``name``
        (what ``nmperm verify`` checksums)."""
        return f"{name}.weight"

    def head(self, model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """What follows the decoder layers: last hidden state ``[B, T, D]`` -> logits ``[B, T, V]``.
        This default is the Hugging Face decoder-only layout (final ``model.model.norm``, then the
        output embeddings); a family with another (soft-capping, a projection) overrides it."""
        norm, lm_head = model.model.norm, model.get_output_embeddings()
        return lambda hidden: lm_head(norm(hidden))

    def token_head(self, model: nn.Module, head: Callable[[torch.Tensor], torch.Tensor]) -> TokenHead | None:
        """``head`` (this adapter's :meth:`head` as the run calls it) as a :class:`TokenHead`, whose
        :meth:`task_loss` and :meth:`output_distillation` the objectives then take a chunk of
        positions at a time, never the whole logits: for a head that maps every position alone with
        those two losses the next token's cross-entropy and a KL divergence of logits. None (here):
        the objectives take the losses of :meth:`head`'s whole output."""
        return None

    # -- the model's inputs and outputs (defaults: a Hugging Face model with ``.logits``) ------------
    def model_inputs(self, sample: Mapping[str, torch.Tensor]) -> dict:
        """The keyword arguments of the model's forward for one calibration sample: everything but
        its ``labels`` (the objectives compute the loss themselves)."""
        return {k: v for k, v in sample.items() if k != "labels"}

    def labels(self, sample: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """What :meth:`task_loss` compares the output with for one sample, or None (no labels: the
        objectives distil the dense model's outputs instead)."""
        return sample.get("labels")

    def outputs(self, output) -> torch.Tensor:
        """The tensor of a forward's result that folding must leave unchanged (and :meth:`head` computes)."""
        return output.logits

    def task_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The model's own loss of :meth:`head`'s output against :meth:`labels` (here: the next token)."""
        return next_token_cross_entropy(logits, labels)

    def output_distillation(self, output: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """Without labels, how far :meth:`head`'s output is from the dense model's (here: logits, a KL divergence)."""
        return kl_distillation(output, dense)
