"""Tiny random models and a tokenizer built offline, for fast structural tests."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

TEXT = (
    "Structured sparsity keeps two of every four weights. The order of channels decides which weights "
    "compete, so a learned permutation puts important weights in different groups. "
) * 40


def tiny_config(family: str = "llama", kv_heads: int = 2, tied: bool = False):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        vocab_size=300,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
    )
    configs = {
        "llama": lambda: LlamaConfig(**common),
        "mistral": lambda: MistralConfig(**common, sliding_window=None),
        "qwen2": lambda: Qwen2Config(**common),  # q/k/v bias
        "qwen3": lambda: Qwen3Config(**common, head_dim=16),  # q/k norms
    }
    return configs[family]()


def tiny_model(family: str = "llama", kv_heads: int = 2, tied: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, kv_heads, tied)).eval()
    with torch.no_grad():  # random biases so that folding them is tested too
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0, 0.1)
    return model


FAMILIES = ("gemma2", "gemma3_text", "phi3", "opt", "opt-projected", "opt-postnorm")
FAMILIES += ("mixtral", "qwen2_moe", "qwen3_moe", "gpt2")


def family_config(family: str, **overrides):
    """A tiny random config of a non-Llama family (tests/test_architectures.py, bench/architectures.py).

    Gemma: head_dim 32 (heads x head_dim != hidden, as in the real models), soft-capping, a sliding
    window shorter than the test sequences, and (Gemma 3) a sliding and a global layer. OPT: as
    opt-125m (pre-norm, tied), with ``project_in``/``project_out`` (-projected), post-norm (-postnorm,
    as opt-350m). Mixture-of-experts: 4 experts, top 2; Qwen2-MoE with its shared expert and a dense
    second layer (``mlp_only_layers``), Qwen3-MoE with q/k norms. GPT-2: ``Conv1D``, tied head."""
    from transformers import (
        Gemma2Config,
        Gemma3TextConfig,
        GPT2Config,
        MixtralConfig,
        OPTConfig,
        Phi3Config,
        Qwen2MoeConfig,
        Qwen3MoeConfig,
    )

    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=300)
    decoder = dict(common, intermediate_size=128, num_key_value_heads=2, max_position_embeddings=256)
    gemma = dict(decoder, head_dim=32, sliding_window=16, final_logit_softcapping=30.0)
    opt = dict(common, ffn_dim=128, max_position_embeddings=256, word_embed_proj_dim=64)
    moe = dict(decoder, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    gpt2 = dict(n_embd=64, n_layer=2, n_head=4, vocab_size=300, n_positions=256)
    configs = {
        "gemma2": lambda: Gemma2Config(**gemma, attn_logit_softcapping=50.0),
        "gemma3_text": lambda: Gemma3TextConfig(**gemma, layer_types=["sliding_attention", "full_attention"]),
        "phi3": lambda: Phi3Config(**decoder, bos_token_id=1, eos_token_id=2, pad_token_id=0),
        "opt": lambda: OPTConfig(**opt),
        "opt-projected": lambda: OPTConfig(**(opt | dict(word_embed_proj_dim=32))),
        "opt-postnorm": lambda: OPTConfig(**(opt | dict(word_embed_proj_dim=32, do_layer_norm_before=False))),
        "mixtral": lambda: MixtralConfig(**(decoder | dict(intermediate_size=32, num_local_experts=4))),
        "qwen2_moe": lambda: Qwen2MoeConfig(**moe, shared_expert_intermediate_size=64, mlp_only_layers=[1]),
        "qwen3_moe": lambda: Qwen3MoeConfig(**moe, head_dim=16, norm_topk_prob=True),
        "gpt2": lambda: GPT2Config(**gpt2, bos_token_id=1, eos_token_id=2),
    }
    config = configs[family]()
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def family_model(family: str, seed: int = 0, **overrides):
    """A tiny random model of ``family`` (see :func:`family_config`) in float32, with every vector
    parameter (norm weights and biases, linear biases) randomised so that folding them is tested:
    Gemma's norms start at zero (``x * (1 + w)``), where a missing permutation would go unnoticed."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(family, **overrides), dtype=torch.float32).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 1:
                parameter.add_(torch.randn_like(parameter) * 0.2)
    return model


def unsupported_model():
    """A tiny model of a family no adapter handles (GPT-NeoX), for the refusal tests."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64)
    config.vocab_size = 300
    return GPTNeoXForCausalLM(config)


def verify_saved(model, sidecar, directory, capsys) -> dict:
    """Save ``model`` and ``sidecar`` to ``directory``, run ``nmperm verify --json`` on it and return
    the report, which must have passed and loaded the model as its own class."""
    import json

    from nmperm_plugin.cli.commands import main
    from nmperm_plugin.io.checkpoint import finish_sidecar

    model.save_pretrained(directory)
    finish_sidecar(directory, sidecar, verify=False)
    capsys.readouterr()
    assert main(["verify", str(directory), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["checks"][0]["detail"] == type(model).__name__  # loaded as its own class
    return report


def assert_pruned_nm(model, sidecar) -> None:
    """Every linear in ``sidecar``'s frames is 2:4 (``fold: gather``: in the serving form, which
    :func:`nmperm_plugin.learn.fold.apply_gather` builds in place)."""
    from nmperm_plugin.core.nm import NMPattern, is_nm
    from nmperm_plugin.learn.fold import apply_gather

    if sidecar.fold == "gather":
        apply_gather(model, sidecar)
    for name in sidecar.frames:
        module = model.get_submodule(name)
        assert is_nm(getattr(module, "linear", module).weight, NMPattern(2, 4)), name


def assert_same_function(actual: torch.Tensor, expected: torch.Tensor, tolerance: float = 1e-5) -> None:
    """Outputs agree to ``tolerance`` of their scale (``nmperm_plugin.core.ops.function_error``): a folded
    model's logits differ only by rounding, which grows with the logits' magnitude and differs by host."""
    from nmperm_plugin.core.ops import function_error

    error = function_error(expected, actual)
    assert error <= tolerance, f"outputs differ by {error:.3g} of their scale (> {tolerance:g})"


@torch.no_grad()
def randomise_vectors_(model, names: tuple[str, ...] = ("token",)):
    """Add noise to every vector parameter (norms, biases, LayerScale) and to the parameters whose name
    holds one of ``names`` (tokens, position embeddings), which random inits leave constant or near
    zero: a permutation a fold forgot to apply to them would go unnoticed. Returns ``model``."""
    for name, parameter in model.named_parameters():
        if parameter.ndim == 1 or any(part in name for part in names):
            parameter.add_(torch.randn_like(parameter) * 0.2)
    return model


@pytest.fixture
def images() -> list[dict]:
    """Two batches of three 16x16 RGB images with class labels (of 10), as an image processor and a
    collator give them."""
    generator = torch.Generator().manual_seed(1)
    batch = lambda: {  # noqa: E731
        "pixel_values": torch.randn(3, 3, 16, 16, generator=generator),
        "labels": torch.randint(0, 10, (3,), generator=generator),
    }
    return [batch(), batch()]


@pytest.fixture(scope="module")
def one_thread():
    """Many tiny matmuls (llm-compressor's pipelines) run far faster on one thread on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<eos>"])
    tok.train_from_iterator([TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(0, 300, (6, 32), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def saved_model(tmp_path, tokenizer):
    """A tiny Llama saved with its tokenizer, plus a calibration text file."""
    model = tiny_model()
    directory = tmp_path / "tiny-llama"
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    text = tmp_path / "calib.txt"
    text.write_text(TEXT)
    return directory, text
