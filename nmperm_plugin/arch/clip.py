"""CLIP's vision tower: ``CLIPVisionModel`` and ``CLIPVisionModelWithProjection`` (``clip_vision_model``).

The encoder layer is the pre-norm block of :class:`~nmperm_plugin.arch.decoder.DecoderAdapter`:
``layer_norm1`` feeds ``self_attn.q/k/v_proj``, ``self_attn.out_proj`` writes back, ``layer_norm2``
feeds the MLP ``fc1`` -> ``fc2`` (quick-GELU, elementwise). So ``mlp_out`` folds into ``fc1``'s rows
and bias and ``attn_out`` into ``v_proj``'s rows and bias, per head.

The global ``hidden`` permutation is a site only where something after the tower reads the stream:
``CLIPVisionModelWithProjection``'s ``visual_projection``. It starts at the patch embedding (a
``Conv2d`` without bias: its output channels), the class embedding ``[D]``, the position embedding's
columns and ``pre_layrnorm``, and ends at ``post_layernorm`` and the projection's columns, so
``image_embeds`` is unchanged (``last_hidden_state`` comes out in the permuted order). A bare
``CLIPVisionModel``'s outputs *are* the residual stream (``last_hidden_state`` and the pooled,
``post_layernorm``-ed class token), which a consumer outside the model (CLIP's projection, a
vision-language model's projector) reads in its own order: there the exact fold's ``hidden`` site
is ``fixed`` (the identity: the linears that read the stream are pruned in their own order), only
the per-layer sites are permuted, and every output is unchanged.

Without labels (a tower has none) the end-to-end objective distils the output features
(:func:`~nmperm_plugin.arch.base.feature_distillation`), as well as every layer's hidden states.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
from torch import nn

from ..core.ops import permute_channels_, permute_embedding_, permute_inputs_, permute_outputs_
from .base import Adapter, Site, feature_distillation
from .decoder import DecoderAdapter, permute_norm_


class CLIPVisionAdapter(DecoderAdapter):
    """``CLIPVisionModel``: per-layer sites only in exact mode (its outputs are the residual stream)."""

    name = "clip_vision"
    model_types = ("clip_vision_model",)
    tower = ""  # the CLIPVisionModel's path in the model
    layers = "encoder.layers"
    attn_in = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    attn_out = "self_attn.out_proj"
    mlp_in = ("mlp.fc1",)
    mlp_out = "mlp.fc2"
    attn_norm = "layer_norm1"
    mlp_norm = "layer_norm2"
    model_inputs = Adapter.model_inputs  # the image batch without labels (no cache to turn off)
    labels = Adapter.labels

    def _tower(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.tower) if self.tower else model

    def sites(self, model: nn.Module, fold: str) -> list[Site]:
        """:class:`DecoderAdapter`'s sites; without a consumer of the stream, the global ``hidden``
        site is ``fixed`` (the identity): its readers are pruned in their own order."""
        return [replace(s, fixed=True) if s.kind == "hidden" else s for s in super().sites(model, fold)]

    def fold_residual_ends(self, model: nn.Module, perm: torch.Tensor) -> None:
        """Nothing to fold: a bare tower's ``hidden`` site is the identity (its outputs are the stream)."""
        if not torch.equal(perm, torch.arange(len(perm))):
            raise ValueError(f"{type(model).__name__}: the residual stream is the output; it cannot be permuted")

    def head(self, model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """The last layer's output is ``last_hidden_state`` itself."""
        return lambda hidden: hidden

    def outputs(self, output) -> torch.Tensor:
        return output.last_hidden_state

    def output_distillation(self, output: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """Features, not logits: their relative squared distance."""
        return feature_distillation(output, dense)


class CLIPVisionProjectionAdapter(CLIPVisionAdapter):
    """``CLIPVisionModelWithProjection``: the global ``hidden`` site too, kept through ``image_embeds``."""

    name = "clip_vision_projection"
    tower = "vision_model"
    layers = "vision_model.encoder.layers"

    def matches(self, model: nn.Module) -> bool:
        return super().matches(model) and isinstance(getattr(model, "visual_projection", None), nn.Linear)

    def sites(self, model: nn.Module, fold: str) -> list[Site]:
        return DecoderAdapter.sites(self, model, fold)

    def fold_residual_ends(self, model: nn.Module, perm: torch.Tensor) -> None:
        """Patch-embedding channels, class and position embeddings, both layernorms, the projection."""
        tower = self._tower(model)
        permute_outputs_(tower.embeddings.patch_embedding, perm)
        permute_channels_(tower.embeddings.class_embedding, perm)
        permute_embedding_(tower.embeddings.position_embedding, perm)
        permute_norm_(tower.pre_layrnorm, perm)
        permute_norm_(tower.post_layernorm, perm)
        permute_inputs_(model.visual_projection, perm)

    def head(self, model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """``image_embeds``: the class token through ``post_layernorm`` and ``visual_projection``."""
        norm, projection = self._tower(model).post_layernorm, model.visual_projection
        return lambda hidden: projection(norm(hidden[:, 0]))

    def outputs(self, output) -> torch.Tensor:
        return output.image_embeds
