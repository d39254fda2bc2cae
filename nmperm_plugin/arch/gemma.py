"""Gemma 2 and Gemma 3 (text) adapter.

Gemma's RMSNorm computes ``x_hat * (1 + w)``: reordering ``w`` still reorders the output exactly, as
the statistic is order-independent. Each layer has four norms: ``input_layernorm`` feeds q/k/v,
``pre_feedforward_layernorm`` feeds gate/up, and ``post_attention_layernorm`` /
``post_feedforward_layernorm`` normalise the attention and MLP outputs *before* the residual add, so
they live in the residual stream's order and the ``hidden`` permutation reorders them too. The scaled
embedding (a scalar factor), the tied head, the final and attention logit soft-capping and Gemma 3's
q/k norms (within a head) are all indifferent to channel order.
"""

from __future__ import annotations

from .decoder import DecoderAdapter


class GemmaAdapter(DecoderAdapter):
    """Gemma 2 (``gemma2``) and Gemma 3's text model (``gemma3_text``, ``Gemma3ForCausalLM``)."""

    name = "gemma"
    model_types = ("gemma2", "gemma3_text")
    mlp_norm = "pre_feedforward_layernorm"
    residual_norms = ("post_attention_layernorm", "post_feedforward_layernorm")
