"""timm's ``VisionTransformer`` (``timm.models.vision_transformer``): a classifier on image tensors.

A block is transformers' ViT block (:mod:`nmperm_plugin.arch.vit`) with a fused ``attn.qkv`` (rows
``[queries | keys | values]``, each head-major, with bias), as the Qwen2-VL vision tower's: ``norm1``
feeds ``qkv``, ``attn.proj`` writes back, ``norm2`` feeds ``mlp.fc1`` -> ``mlp.fc2`` (GELU, or any
elementwise activation). So the sites and per-block folds are :class:`DecoderAdapter`'s: ``mlp_out``
folds into ``fc1``'s rows and bias, ``attn_out`` into the value rows of ``qkv`` per head. The q/k norms
(``qk_norm=True``) normalise each head's queries and keys, which no site moves. LayerScale
(``init_values``: ``ls1``, ``ls2``) scales the residual branches channel-wise: its ``gamma`` moves with
the stream.

The stream (exact ``hidden``) starts at the patch embedding's ``Conv2d`` output channels and bias
(and ``patch_embed.norm``), the class and register tokens and ``pos_embed``, all ``[..., D]``, and
``norm_pre``; it ends at the final ``norm``, the pooling (``token``: the class token; ``avg``, ``max``,
``avgmax``: per channel over the tokens; ``''``: none, the head on every token: all order-free),
``fc_norm`` and the ``head``'s columns. ``dynamic_img_size`` resamples ``pos_embed`` per channel: also
order-free. Attention pooling (``map``, ``prr``), other blocks, attention or MLP layers (``SwiGLU``,
``GluMlp``), the norms inside them (``scale_attn_norm``, ``scale_mlp_norm``), a gated attention and a
model without a head are refused by name.

Calibration: batches with ``pixel_values`` ``[B, C, H, W]`` (and class ``labels``), as for
transformers' ViT; the forward takes the tensor ``x`` and returns the logits.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping

import torch
from torch import nn
from transformers import PretrainedConfig

from ..core.ops import permute_channels_, permute_inputs_, permute_outputs_
from .base import Adapter, Site, class_cross_entropy
from .decoder import DecoderAdapter, permute_norm_


def _unsupported(model: nn.Module) -> list[str]:
    """The parts of ``model`` that no fold reproduces exactly (empty: every part is supported)."""
    vt = sys.modules["timm.models.vision_transformer"]
    found = []
    if getattr(model, "attn_pool", None) is not None:
        found.append(f"global_pool={model.global_pool!r} (attention pooling with weights of its own)")
    if not isinstance(model.head, nn.Linear):
        found.append("num_classes=0 (no Linear head: the output is the residual stream itself)")
    for i, block in enumerate(model.blocks):
        if type(block) is not vt.Block:
            found.append(f"blocks.{i}: {type(block).__name__} (block_fn other than Block)")
        elif type(block.attn) is not vt.Attention or type(block.mlp) is not vt.Mlp:
            found.append(f"blocks.{i}: {type(block.attn).__name__}, {type(block.mlp).__name__} (attn_layer, mlp_layer)")
        elif getattr(block.attn, "gate", None) is not None:
            found.append(f"blocks.{i}.attn.gate (a gated attention)")
        else:
            norms = {"attn.norm": getattr(block.attn, "norm", nn.Identity()), "mlp.norm": block.mlp.norm}
            found += [f"blocks.{i}.{n} ({type(m).__name__})" for n, m in norms.items() if type(m) is not nn.Identity]
    return found


class TimmViTAdapter(DecoderAdapter):
    """``timm.models.vision_transformer.VisionTransformer`` with timm's ``Block``, ``Attention`` and
    ``Mlp`` (pooling ``token``, ``avg``, ``max``, ``avgmax`` or none; LayerScale, register tokens, q/k
    norms, ``pre_norm``, ``no_embed_class``, ``dynamic_img_size``); subclasses (DeiT's distilled model) not."""

    name = "timm_vit"
    model_types = ("timm VisionTransformer",)
    layers = "blocks"
    attn_in = ("attn.qkv",)
    value = "attn.qkv"
    attn_out = "attn.proj"
    mlp_in = ("mlp.fc1",)
    mlp_out = "mlp.fc2"
    attn_norm = "norm1"
    mlp_norm = "norm2"
    embeddings = ()
    final_norms = ("norm", "fc_norm")

    def matches(self, model: nn.Module) -> bool:
        timm = sys.modules.get("timm.models.vision_transformer")  # not imported: not a timm model
        return timm is not None and type(model) is timm.VisionTransformer

    def sites(self, model: nn.Module, fold: str) -> list[Site]:
        unsupported = _unsupported(model)
        if unsupported:
            raise ValueError(
                f"timm VisionTransformer: cannot fold permutations exactly into {'; '.join(unsupported)}. "
                "Supported: timm's Block, Attention (ungated) and Mlp (any elementwise act_layer; no SwiGLU or "
                "GluMlp), scale_attn_norm and scale_mlp_norm off, global_pool 'token', 'avg', 'max', 'avgmax' or '' "
                "and num_classes > 0: build the model with those options (or prune it with another tool)."
            )
        return super().sites(model, fold)

    def text_config(self, model: nn.Module) -> PretrainedConfig:
        attn = model.blocks[0].attn
        dim, heads, head_dim = model.embed_dim, attn.num_heads, attn.head_dim
        return PretrainedConfig(hidden_size=dim, num_attention_heads=heads, head_dim=head_dim)

    def value_offset(self, model: nn.Module) -> int:
        return 2 * model.blocks[0].attn.proj.in_features  # after the query and key rows

    def fold_residual_ends(self, model: nn.Module, perm: torch.Tensor) -> None:
        """Patch embedding (output channels, bias, its norm), tokens, positions, ``norm_pre``; the
        blocks' LayerScale gammas; the final ``norm``, ``fc_norm`` and the head's columns."""
        permute_outputs_(model.patch_embed.proj, perm)  # Conv2d [D, C, p, p] and bias
        for name in ("cls_token", "reg_token", "pos_embed"):
            if getattr(model, name, None) is not None:
                permute_channels_(getattr(model, name), perm)
        for norm in (model.patch_embed.norm, model.norm_pre, model.norm, model.fc_norm):
            permute_norm_(norm, perm)
        for block in model.blocks:
            for scale in (block.ls1, block.ls2):
                if hasattr(scale, "gamma"):
                    permute_channels_(scale.gamma, perm)
        permute_inputs_(model.head, perm)

    def head(self, model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """Last block's output ``[B, T, D]`` -> logits ``[B, C]``: the final ``norm``, then timm's own
        ``forward_head`` (pooling, ``fc_norm``, ``head``)."""
        return lambda hidden: model.forward_head(model.norm(hidden))

    def model_inputs(self, sample: Mapping[str, torch.Tensor]) -> dict:
        """The forward's ``x``: the sample's ``pixel_values`` ``[B, C, H, W]``."""
        if "pixel_values" not in sample:
            found = sorted(sample)
            raise ValueError(f"a timm VisionTransformer calibrates on images: every batch needs pixel_values ({found})")
        return {"x": sample["pixel_values"]}

    labels = Adapter.labels  # class indices when the samples have them

    def outputs(self, output) -> torch.Tensor:
        return output  # timm returns the logits tensor itself

    def task_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return class_cross_entropy(logits, labels)
