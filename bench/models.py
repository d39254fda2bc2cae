"""Random-weight Llama models of real shapes, for the benchmarks that time or size a run (their
perplexity means nothing): one seeded builder, so every bench builds the same model for a shape."""

from __future__ import annotations

LLAMA_SHAPES = {  # LlamaConfig fields of each shape
    "smollm2-135m": dict(
        hidden_size=576, num_hidden_layers=30, intermediate_size=1536, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
    ),
    "smollm2-360m": dict(
        hidden_size=960, num_hidden_layers=32, intermediate_size=2560, num_attention_heads=15,
        num_key_value_heads=5, vocab_size=49152, tie_word_embeddings=True,
    ),
    "llama-3.2-1b": dict(
        hidden_size=2048, num_hidden_layers=16, intermediate_size=8192, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
    ),
    "llama-2-7b": dict(
        hidden_size=4096, num_hidden_layers=32, intermediate_size=11008, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False,
    ),
    "llama-3-8b": dict(
        hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0,
    ),
}  # fmt: skip


def llama_config(shape: str | dict, **overrides):
    """The LlamaConfig of a named shape (or of LlamaConfig fields), with ``overrides`` (e.g.
    ``num_hidden_layers=4`` for a few of its layers)."""
    from transformers import LlamaConfig

    fields = LLAMA_SHAPES[shape] if isinstance(shape, str) else shape
    return LlamaConfig(**({"max_position_embeddings": 4096} | fields | overrides))


def random_llama(shape: str | dict, *, dtype=None, device=None, seed: int = 0, **overrides):
    """A frozen, eval-mode LlamaForCausalLM of ``shape`` with weights drawn after
    ``torch.manual_seed(seed)``, built on ``device`` and cast to ``dtype`` (None: as built)."""
    import torch
    from transformers import LlamaForCausalLM

    config = llama_config(shape, **overrides)
    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        model = LlamaForCausalLM(config)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval().requires_grad_(False)
