"""Vision transformers with a classification head: transformers' ViT and DeiT.

A ViT block is the pre-norm Transformer block of the decoder families without the causal mask:
``layernorm_before`` feeds q/k/v (``attention.q_proj``...), ``attention.o_proj`` writes back,
``layernorm_after`` feeds the GELU MLP ``mlp.fc1`` -> ``mlp.fc2``. So the sites and the per-layer folds
are :class:`DecoderAdapter`'s: ``mlp_out`` folds into ``fc1``'s rows and bias (GELU is elementwise),
``attn_out`` into ``v_proj``'s rows and bias per head (no grouped-query attention), and the global
``hidden`` permutation reorders both LayerNorms' weight and bias.

The residual stream starts at the patch embedding (a ``Conv2d``: its output channels and bias), the
class token (DeiT: and the distillation token) and the position embeddings, all ``[..., D]``, and
ends at the final ``layernorm`` and the classifiers' input columns. The classifiers read fixed token
positions (ViT and DeiT: the class token; DeiT with teacher: the mean of the class-token and the
distillation-token classifiers), which no channel permutation moves.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..core.ops import permute_channels_, permute_inputs_, permute_outputs_
from .base import Adapter, class_cross_entropy
from .decoder import DecoderAdapter, find, permute_norm_


class ViTAdapter(DecoderAdapter):
    """``ViTForImageClassification`` (``model_type`` ``vit``)."""

    name = "vit"
    model_types = ("vit",)
    layers = "vit.layers"
    patch_embeddings = "vit.embeddings"  # holds the patch projection, the tokens, the position embeddings
    final_norms = ("vit.layernorm",)
    tokens = ("cls_token", "mask_token")  # [1, 1, D] parameters of the embeddings (when present)
    classifiers: tuple[tuple[str, int], ...] = (("classifier", 0),)  # (module, token position read)
    attn_in = ("attention.q_proj", "attention.k_proj", "attention.v_proj")
    value = "attention.v_proj"
    attn_out = "attention.o_proj"
    mlp_in = ("mlp.fc1",)
    mlp_out = "mlp.fc2"
    attn_norm = "layernorm_before"
    mlp_norm = "layernorm_after"

    def matches(self, model: nn.Module) -> bool:
        return super().matches(model) and bool(self._classifiers(model))

    def _classifiers(self, model: nn.Module) -> list[tuple[nn.Linear, int]]:
        found = [(find(model, name), token) for name, token in self.classifiers]
        return [(module, token) for module, token in found if isinstance(module, nn.Linear)]

    def fold_residual_ends(self, model: nn.Module, perm: torch.Tensor) -> None:
        """Patch-embedding output channels, the class (and distillation, mask) tokens, the position
        embeddings; the final layernorm and the classifiers' columns."""
        embeddings = model.get_submodule(self.patch_embeddings)
        permute_outputs_(embeddings.patch_embeddings.projection, perm)  # Conv2d [D, C, p, p] and bias
        for name in (*self.tokens, "position_embeddings"):
            if getattr(embeddings, name, None) is not None:
                permute_channels_(getattr(embeddings, name), perm)
        for name in self.final_norms:
            permute_norm_(find(model, name), perm)
        for classifier, _ in self._classifiers(model):
            permute_inputs_(classifier, perm)

    def head(self, model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """Last layer's output ``[B, T, D]`` -> logits ``[B, C]``: the final layernorm, then the mean
        of the classifiers on their tokens (one classifier: its logits)."""
        norm, classifiers = model.get_submodule(self.final_norms[0]), self._classifiers(model)

        def head(hidden: torch.Tensor) -> torch.Tensor:
            sequence = norm(hidden)
            return sum(classifier(sequence[:, token]) for classifier, token in classifiers) / len(classifiers)

        return head

    model_inputs = Adapter.model_inputs  # the image batch without its labels (no cache to turn off)
    labels = Adapter.labels  # class indices when the samples have them (no next token to fall back on)

    def task_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the class logits ``[B, C]`` against ``labels`` ``[B]``."""
        return class_cross_entropy(logits, labels)


class DeiTAdapter(ViTAdapter):
    """``DeiTForImageClassification`` and ``DeiTForImageClassificationWithTeacher`` (``deit``)."""

    name = "deit"
    model_types = ("deit",)
    layers = "deit.layers"
    patch_embeddings = "deit.embeddings"
    final_norms = ("deit.layernorm",)
    tokens = ("cls_token", "distillation_token", "mask_token")
    classifiers = (("classifier", 0), ("cls_classifier", 0), ("distillation_classifier", 1))
