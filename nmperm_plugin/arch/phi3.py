"""Phi-3 adapter (Phi-3, Phi-3.5, Phi-4-mini: ``model_type`` ``phi3``): fused projections.

``qkv_proj`` holds the query, key and value rows one after the other, so the exact ``attn_out``
permutation (per KV head) moves only the value rows inside it. ``gate_up_proj`` holds the gate rows
then the up rows, combined elementwise (``up * act(gate)``), so the ``mlp_out`` permutation of
``down_proj``'s input reorders both halves alike.
"""

from __future__ import annotations

import torch
from torch import nn

from .decoder import DecoderAdapter


class Phi3Adapter(DecoderAdapter):
    name = "phi3"
    model_types = ("phi3",)
    attn_in = ("self_attn.qkv_proj",)
    value = "self_attn.qkv_proj"
    mlp_in = ("mlp.gate_up_proj",)

    def value_offset(self, model: nn.Module) -> int:
        heads, kv_heads, head_dim = self._head_layout(model)
        return (heads + kv_heads) * head_dim  # after the query and key rows

    def mlp_in_rows(self, perm: torch.Tensor) -> torch.Tensor:
        return torch.cat([perm, perm + len(perm)])  # the gate half, then the up half
