"""OPT adapter: LayerNorm with bias, ReLU MLP ``fc1``/``fc2``, biased attention and ``out_proj``.

The residual stream starts at the token embedding (or ``project_in``'s output rows, when the
embedding is narrower than the model) plus the learned position embedding, and ends at the decoder's
``final_layer_norm`` (absent in some checkpoints) and ``project_out``'s input columns (or the head's).
LayerNorm's mean and variance are order-independent, so its weight and bias reorder with the stream.

``fold: gather`` needs pre-norm layers (``do_layer_norm_before``, every OPT but 350m): in a post-norm
layer the norm's output is the residual stream itself, so it cannot be gathered for the next linears
alone. The exact fold works for both.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..core.ops import permute_embedding_, permute_inputs_, permute_outputs_
from .base import Site
from .decoder import DecoderAdapter, permute_norm_


class OPTAdapter(DecoderAdapter):
    name = "opt"
    model_types = ("opt",)
    layers = "model.decoder.layers"
    attn_out = "self_attn.out_proj"
    mlp_in = ("fc1",)
    mlp_out = "fc2"
    attn_norm = "self_attn_layer_norm"
    mlp_norm = "final_layer_norm"

    def sites(self, model: nn.Module, fold: str) -> list[Site]:
        if fold == "gather" and not model.config.do_layer_norm_before:
            raise ValueError(
                "opt: fold='gather' needs pre-norm layers, and this model is post-norm (do_layer_norm_before=False): "
                "its layer norms' outputs are the residual stream itself; use fold='exact'"
            )
        return super().sites(model, fold)

    def fold_residual_ends(self, model: nn.Module, perm: torch.Tensor) -> None:
        decoder = model.model.decoder
        permute_embedding_(decoder.embed_positions, perm)
        if decoder.project_in is not None:
            permute_outputs_(decoder.project_in, perm)
        else:
            permute_embedding_(decoder.embed_tokens, perm)
        permute_norm_(decoder.final_layer_norm, perm)
        head = model.get_output_embeddings()
        if decoder.project_out is not None:  # the head reads project_out's output, in its own order
            permute_inputs_(decoder.project_out, perm)
        elif head.weight is not decoder.embed_tokens.weight:  # tied: already permuted with the embedding
            permute_inputs_(head, perm)

    def head(self, model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """The decoder's final norm (when present), ``project_out`` (when present), the head."""
        decoder, lm_head = model.model.decoder, model.get_output_embeddings()
        stages = [m for m in (decoder.final_layer_norm, decoder.project_out, lm_head) if m is not None]

        def head(hidden: torch.Tensor) -> torch.Tensor:
            for stage in stages:
                hidden = stage(hidden)
            return hidden

        return head
