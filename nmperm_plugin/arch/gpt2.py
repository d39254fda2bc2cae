"""GPT-2 (``GPT2LMHeadModel``): ``Conv1D`` layers, fused ``c_attn``, LayerNorm with bias, GELU MLP,
learned position embeddings, tied head.

``Conv1D`` computes ``x @ W + b`` with ``W`` stored ``[in, out]``; in the adapter's
:meth:`~GPT2Adapter.linear_form` each is an ``nn.Linear`` whose weight is the transposed view
``[out, in]`` (and whose bias is the same parameter), so sites, masks, folds and ``nmperm verify``
read it as any linear; N:M is along the input dimension, the stored weight's rows. ``c_attn`` holds
the query, key and value rows of ``[out, in]`` one after the other (each ``D``), so the exact
``attn_out`` permutation moves only the value rows. The residual stream starts at the token and
position embeddings' columns and ends at ``ln_f``; the head is tied to ``wte``.
"""

from __future__ import annotations

from torch import nn
from transformers.pytorch_utils import Conv1D

from .decoder import DecoderAdapter
from .views import LinearViews, linear_view, write_back


def conv_as_linear(conv: Conv1D) -> nn.Linear:
    """An ``nn.Linear`` view of ``conv``: weight ``conv.weight.T``, the same bias parameter."""
    return linear_view(conv.weight.detach().T, conv.bias)


def restore_conv(conv: Conv1D, linear: nn.Linear) -> None:
    """Write a replaced ``[out, in]`` weight back into ``conv``'s ``[in, out]`` one."""
    write_back(conv.weight.data.T, linear.weight.data)


class GPT2Adapter(LinearViews, DecoderAdapter):
    name = "gpt2"
    model_types = ("gpt2",)
    layers = "transformer.h"
    attn_in = ("attn.c_attn",)
    value = "attn.c_attn"
    attn_out = "attn.c_proj"
    mlp_in = ("mlp.c_fc",)
    mlp_out = "mlp.c_proj"
    attn_norm = "ln_1"
    mlp_norm = "ln_2"
    embeddings = ("transformer.wte", "transformer.wpe")
    final_norms = ("transformer.ln_f",)

    stand_in, restore = conv_as_linear, restore_conv

    def linear_paths(self, model: nn.Module) -> list[str]:
        """Every ``Conv1D`` of the decoder layers (inside a ``GatherLinear`` too)."""
        layers = self.decoder_layers(model)
        return [f"{self.layers}.{name}" for name, module in layers.named_modules() if isinstance(module, Conv1D)]

    def value_offset(self, model: nn.Module) -> int:
        return 2 * model.config.hidden_size  # after the query and key rows
