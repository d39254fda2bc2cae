"""Llama-family adapter: Llama, Mistral, Qwen2 (attention bias), Qwen3 (q/k norms), SmolLM."""

from __future__ import annotations

from .decoder import DecoderAdapter


class LlamaAdapter(DecoderAdapter):
    """Sites per SPEC 3: ``mlp_out`` (free), ``attn_out`` (per KV head in exact mode), ``hidden``.

    The :class:`DecoderAdapter` defaults are the Llama layout: q/k/v/o, gate/up/down, RMSNorm
    ``input_layernorm`` and ``post_attention_layernorm``, ``model.embed_tokens``, ``model.norm``."""

    name = "llama"
    model_types = ("llama", "mistral", "qwen2", "qwen3")
