"""Qwen2.5-VL and Qwen2-VL: ``Qwen2_5_VLForConditionalGeneration`` and ``Qwen2VLForConditionalGeneration``
(``model_type`` ``qwen2_5_vl``, ``qwen2_vl``).

The model is ``model.visual`` (the vision tower: patch embedding, blocks with a fused ``qkv``, the
patch merger) and ``model.language_model`` (a Qwen2 decoder: q/k/v with bias, grouped-query
attention, SiLU-gated MLP, RMSNorm), then ``lm_head``. :class:`QwenVLAdapter` makes the text
decoder's layers the sites, as for :class:`~nmperm_plugin.arch.llama.LlamaAdapter`
(``model.language_model.layers.i``): ``permute_(model, ...)`` prunes the text decoder and leaves the
tower dense (what the paper prunes). The multimodal rotary positions (``mrope``, computed from
``input_ids`` and ``image_grid_thw``) rotate each head's query and key, not the channels any site
permutes. The tower is pruned by its own adapter
(:class:`~nmperm_plugin.arch.qwen_vl_vision.QwenVisionTowerAdapter`, ``permute_(model.model.visual,
...)``); :func:`~.learn.parts.permute_parts_` prunes the chosen parts (``parts=("vision", "text")``: the tower
first, then the decoder on the pruned tower's image features) with ``ignore`` patterns matched
against the whole model's names, and returns one sidecar for the whole model.

The exact ``hidden`` permutation of the text residual stream starts at ``embed_tokens``' columns
*and* at the patch merger's output (``model.visual.merger.mlp.2``: rows and bias), whose image
features replace the image placeholder tokens' embeddings; it ends at the final ``norm`` and the
columns of ``lm_head`` (nothing when tied). In ``fold: gather`` only ``mlp_out`` is folded and the
tower is untouched.

Calibration: token ids ``[N, T]`` (text only), or dicts of model inputs with every tensor batch-first:
``input_ids`` ``[B, T]`` (``attention_mask``), and for images ``pixel_values`` ``[B, P, C*t*p*p]``
and ``image_grid_thw`` ``[B, images, 3]`` (:func:`per_sample_images` reshapes a processor's packed
output to that). The layer walk takes the layers' keyword arguments (the rotary positions) from the
first sample, so every sample has the same layout: length, image placeholder positions and grids.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import torch
from torch import nn
from transformers import PretrainedConfig

from ..core.ops import permute_outputs_
from .base import Site
from .decoder import DecoderAdapter
from .qwen_vl_vision import QwenVisionTowerAdapter

TOWER = "model.visual"  # the vision tower's path in the model
VISION = QwenVisionTowerAdapter()
PACKED = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")  # not batch-first in the model


def per_sample_images(inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A processor's output (``pixel_values`` ``[all patches, D]``, ``image_grid_thw`` ``[images, 3]``,
    images in sample order) as a calibration batch with every tensor batch-first: ``pixel_values``
    ``[B, P, D]`` and ``image_grid_thw`` ``[B, images, 3]``. Every sample must hold the same number
    of images and patches (the layer walk needs one layout)."""
    batch = len(inputs["input_ids"])
    out = dict(inputs)
    for pixels, grid in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        if inputs.get(grid) is None:
            continue
        if len(inputs[grid]) % batch or len(inputs[pixels]) % batch:
            raise ValueError(f"{grid}: {len(inputs[grid])} images for {batch} samples; give each sample the same")
        out[grid] = inputs[grid].reshape(batch, -1, 3)
        out[pixels] = inputs[pixels].reshape(batch, -1, inputs[pixels].shape[-1])
    return out


class QwenVLAdapter(DecoderAdapter):
    """``Qwen2_5_VLForConditionalGeneration``, ``Qwen2VLForConditionalGeneration``: the text decoder."""

    name = "qwen_vl"
    model_types = ("qwen2_5_vl", "qwen2_vl")
    layers = "model.language_model.layers"
    embeddings = ("model.language_model.embed_tokens",)
    final_norms = ("model.language_model.norm",)
    merger_out = f"{TOWER}.merger.mlp.2"  # the image features' last linear, [text hidden, ...]

    def text_config(self, model: nn.Module) -> PretrainedConfig:
        """``config.text_config``: the decoder's sizes (the top-level config has none)."""
        return model.config.text_config

    def fold_residual_ends(self, model: nn.Module, perm: torch.Tensor) -> None:
        """The text embeddings, the final norm and ``lm_head`` (:class:`DecoderAdapter`), and the patch
        merger's output rows and bias: image features enter the stream in its order."""
        super().fold_residual_ends(model, perm)
        permute_outputs_(model.get_submodule(self.merger_out), perm)

    def model_inputs(self, sample: Mapping[str, torch.Tensor]) -> dict:
        """The sample's inputs without labels, no cache, and the image inputs in the model's packed
        form: ``pixel_values`` ``[1, P, D]`` -> ``[P, D]``, ``image_grid_thw`` ``[1, n, 3]`` -> ``[n, 3]``."""
        inputs = super().model_inputs(sample)
        return inputs | {k: inputs[k].flatten(0, 1) for k in PACKED if inputs.get(k) is not None}

    def labels(self, sample: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """The sample's ``labels``, else its ``input_ids`` with the image and video placeholders
        (``mm_token_type_ids`` non-zero) ignored: the next token is learned on the text only."""
        if "labels" in sample or "mm_token_type_ids" not in sample:
            return super().labels(sample)
        return sample["input_ids"].masked_fill(sample["mm_token_type_ids"] != 0, -100)

    def serving_sites(self, model: nn.Module, fold: str) -> list[Site]:
        """The text decoder's sites and the vision tower's, in the model's names (``model.visual.``
        before the tower's): a checkpoint of :func:`~nmperm_plugin.learn.parts.permute_parts_` may record both."""
        tower = model.get_submodule(TOWER)
        return self.sites(model, fold) + [renamed(s, lambda n: f"{TOWER}.{n}") for s in VISION.sites(tower, fold)]

    def apply_gather(self, model: nn.Module, site: Site, perm: torch.Tensor) -> None:
        """A text decoder's site here, a vision tower's (``model.visual.``...) by the tower's adapter."""
        if not site.name.startswith(f"{TOWER}."):
            super().apply_gather(model, site, perm)
            return
        in_tower = renamed(site, lambda n: n.removeprefix(f"{TOWER}."))
        VISION.apply_gather(model.get_submodule(TOWER), in_tower, perm)


def renamed(site: Site, rename: Callable[[str], str]) -> Site:
    """``site`` with ``rename`` applied to its name and its linears' names."""
    return dataclasses.replace(site, name=rename(site.name), linears=tuple(rename(n) for n in site.linears))
