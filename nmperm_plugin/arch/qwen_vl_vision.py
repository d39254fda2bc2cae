"""The vision tower of Qwen2.5-VL and Qwen2-VL: ``Qwen2_5_VisionTransformerPretrainedModel`` and
``Qwen2VisionTransformerPretrainedModel`` (``model.model.visual``; config ``model_type``
``qwen2_5_vl_vision``, ``qwen2_vl_vision``), pruned by itself: ``permute_(model.model.visual, ...)``.

A block is the pre-norm block of :class:`~nmperm_plugin.arch.decoder.DecoderAdapter`: ``norm1`` (RMSNorm;
Qwen2-VL: LayerNorm) feeds the fused ``attn.qkv`` (rows ``[queries | keys | values]``, each head-major,
with bias), ``attn.proj`` writes back, ``norm2`` feeds the MLP: Qwen2.5-VL's SiLU-gated
``mlp.gate_proj``, ``mlp.up_proj`` -> ``mlp.down_proj``, Qwen2-VL's GELU ``mlp.fc1`` -> ``mlp.fc2``, all
with biases. So ``mlp_out`` folds into the gate and up (or ``fc1``) rows and biases, and ``attn_out``
into the value rows of ``qkv`` and their bias, per head (no grouped-query attention), as Phi-3's fused
``qkv_proj``. The 2-D rotary embedding rotates each head's queries and keys, which no site moves.

The residual stream (exact ``hidden``) starts at the patch embedding's ``Conv3d`` output channels (no
bias) and ends in the patch merger, which is the tower's head: ``merger.ln_q`` (weight; Qwen2-VL: and
bias), then ``merger.mlp.0``, whose input is ``spatial_merge_size ** 2`` consecutive tokens side by side,
so its columns are that many copies of the stream, each permuted alike. The merger's output (the image
features, ``pooler_output``) is unchanged; the merger itself stays dense (it is not a walked layer).
Without labels the end-to-end objective distils those features
(:func:`~nmperm_plugin.arch.base.feature_distillation`).

Calibration: batches with ``pixel_values`` ``[B, P, C*t*p*p]`` and ``image_grid_thw`` ``[B, images, 3]``
(the batch-first form of :func:`nmperm_plugin.arch.qwen_vl.per_sample_images`; other keys, e.g. the
text's, are ignored), every sample with the same grids. The blocks take one image sequence ``[T, D]``
with ``cu_seqlens`` (the attention's bounds: per image, or per window in Qwen2.5-VL's windowed blocks)
and no batch dimension; within :meth:`QwenVisionTowerAdapter.linear_form` (the whole pipeline run) each
block takes ``[B, T, D]`` instead, B sequences of that layout attending separately (:func:`batched_blocks`).
The layer walk records each block's own ``cu_seqlens``. Qwen2.5-VL's window order of the tokens is set
before the first block and undone after the merger, outside the walked layers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn
from transformers import PretrainedConfig

from ..core.ops import permute_inputs_, permute_outputs_
from .base import feature_distillation
from .decoder import DecoderAdapter, MLPBranch, permute_norm_

GATED = MLPBranch("mlp_out", "mlp.down_proj", ("mlp.gate_proj", "mlp.up_proj"))  # Qwen2.5-VL
PLAIN = MLPBranch("mlp_out", "mlp.fc2", ("mlp.fc1",))  # Qwen2-VL


def _sequences_forward(block: nn.Module) -> Callable[..., torch.Tensor]:
    """``block``'s forward on ``[B, T, D]``: the B sequences side by side as one ``[B * T, D]``, each
    attending within its own bounds (``cu_seqlens`` of one sequence, repeated at offsets of T) with its
    own rotary embedding (``position_embeddings`` of one sequence, repeated)."""
    forward = type(block).forward

    def sequences(hidden_states, cu_seqlens, position_embeddings=None, **kwargs):
        batch, length = hidden_states.shape[:2]
        offsets = torch.arange(batch, device=cu_seqlens.device, dtype=cu_seqlens.dtype)[:, None] * length
        bounds = torch.cat([(cu_seqlens[:-1] + offsets).flatten(), cu_seqlens.new_tensor([batch * length])])
        if position_embeddings is not None:
            position_embeddings = tuple(p.repeat(batch, 1) for p in position_embeddings)
        flat = forward(block, hidden_states.flatten(0, 1), bounds, position_embeddings, **kwargs)
        return flat.unflatten(0, (batch, length))

    return sequences


def _one_sequence(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook: the tower's own ``[T, D]`` call as one sequence ``[1, T, D]``."""
    if args and args[0].ndim == 2:
        return (args[0][None], *args[1:]), kwargs
    return args, kwargs


@contextlib.contextmanager
def batched_blocks(blocks: nn.ModuleList) -> Iterator[nn.ModuleList]:
    """Within the block, every block of ``blocks`` takes (and returns) ``[B, T, D]``, and the tower's
    own ``[T, D]`` hidden states enter the first as ``[1, T, D]`` (the merger flattens the tokens
    again). Re-entrant: blocks already batched are left alone."""
    fresh = [block for block in blocks if "forward" not in vars(block)]
    handles = []
    for block in fresh:
        block.forward = _sequences_forward(block)
        handles.append(block.register_forward_pre_hook(_one_sequence, with_kwargs=True, prepend=True))
    try:
        yield blocks
    finally:
        for block, handle in zip(fresh, handles, strict=True):
            handle.remove()
            del block.forward


class QwenVisionTowerAdapter(DecoderAdapter):
    """The vision tower of Qwen2.5-VL (gated MLP, RMSNorm) and Qwen2-VL (GELU MLP, LayerNorm)."""

    name = "qwen_vl_vision"
    model_types = ("qwen2_5_vl_vision", "qwen2_vl_vision")
    layers = "blocks"
    attn_in = ("attn.qkv",)
    value = "attn.qkv"
    attn_out = "attn.proj"
    attn_norm = "norm1"
    mlp_norm = "norm2"
    embeddings = ()
    final_norms = ()

    def matches(self, model: nn.Module) -> bool:
        return super().matches(model) and isinstance(getattr(model, "merger", None), nn.Module)

    def text_config(self, model: nn.Module) -> PretrainedConfig:
        """The blocks' sizes (the vision config's ``hidden_size`` is Qwen2-VL's merger output)."""
        dim, heads = model.patch_embed.embed_dim, model.blocks[0].attn.num_heads
        return PretrainedConfig(hidden_size=dim, num_attention_heads=heads, num_key_value_heads=heads)

    def value_offset(self, model: nn.Module) -> int:
        return 2 * model.patch_embed.embed_dim  # after the query and key rows

    def mlp_branches(self, layer: nn.Module) -> list[MLPBranch]:
        return [GATED if hasattr(layer.mlp, "down_proj") else PLAIN]

    def linear_form(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """The blocks batched (:func:`batched_blocks`): the pipeline walks ``[N, T, D]``; every site's
        weight already is an ``nn.Linear``."""
        return batched_blocks(self.decoder_layers(model))

    def fold_residual_ends(self, model: nn.Module, perm: torch.Tensor) -> None:
        """The patch embedding's output channels; the merger's ``ln_q`` and its first linear's columns,
        one copy of the stream per merged token."""
        permute_outputs_(model.patch_embed.proj, perm)  # Conv3d [D, C, t, p, p], no bias
        permute_norm_(model.merger.ln_q, perm)
        copies = torch.arange(model.spatial_merge_size**2)[:, None] * len(perm)
        permute_inputs_(model.merger.mlp[0], (copies + perm).flatten())

    def head(self, model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """Last block's output ``[B, T, D]`` -> the merger's image features ``[B, T / merged, out]`` (in
        the blocks' token order)."""
        merger = model.merger
        return lambda hidden: merger(hidden).unflatten(0, (len(hidden), -1))

    def model_inputs(self, sample: Mapping[str, torch.Tensor]) -> dict:
        """The tower's inputs from a sample's ``pixel_values`` ``[1, P, D]`` and ``image_grid_thw``
        ``[1, n, 3]``: the patches ``[P, D]`` and the grids ``[n, 3]``."""
        missing = [key for key in ("pixel_values", "image_grid_thw") if key not in sample]
        if missing:
            raise ValueError(
                f"the vision tower calibrates on images: each batch needs {' and '.join(missing)} (batch-first, "
                f"nmperm_plugin.arch.qwen_vl.per_sample_images), found {sorted(sample)}"
            )
        pixels, grids = sample["pixel_values"], sample["image_grid_thw"]
        return {"hidden_states": pixels.flatten(0, 1), "grid_thw": grids.flatten(0, 1)}

    def labels(self, sample: Mapping[str, torch.Tensor]) -> None:
        """None, whatever the sample holds (a VL batch's ``labels`` are the text's): the task term
        distils the dense tower's image features."""
        return None

    def outputs(self, output) -> torch.Tensor:
        return output.pooler_output

    def output_distillation(self, output: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """Features, not logits: their relative squared distance."""
        return feature_distillation(output, dense)
