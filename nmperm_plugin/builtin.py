"""The built-in plugin: mask generators, the architecture adapters (Llama family, Gemma 2/3, Phi-3,
OPT, ViT, DeiT, CLIP's vision tower, Mixtral, Qwen2/3-MoE, GPT-2, Qwen2.5-VL and Qwen2-VL's text
decoder and vision tower, timm's VisionTransformer), the heuristic solvers and the objectives,
registered through the same hooks as a third-party plugin."""

from __future__ import annotations

from .arch.clip import CLIPVisionAdapter, CLIPVisionProjectionAdapter
from .arch.gemma import GemmaAdapter
from .arch.gpt2 import GPT2Adapter
from .arch.llama import LlamaAdapter
from .arch.moe import MixtralAdapter, QwenMoEAdapter
from .arch.opt import OPTAdapter
from .arch.phi3 import Phi3Adapter
from .arch.qwen_vl import QwenVLAdapter
from .arch.qwen_vl_vision import QwenVisionTowerAdapter
from .arch.timm_vit import TimmViTAdapter
from .arch.vit import DeiTAdapter, ViTAdapter
from .core.scores import BUILTIN_GENERATORS
from .core.solvers import HEURISTICS
from .learn.objectives import BUILTIN_OBJECTIVES
from .plugins.hooks import hookimpl


@hookimpl
def nmperm_mask_generators() -> list:
    return list(BUILTIN_GENERATORS)


@hookimpl
def nmperm_architectures() -> list:
    return [
        LlamaAdapter(),
        GemmaAdapter(),
        Phi3Adapter(),
        OPTAdapter(),
        ViTAdapter(),
        DeiTAdapter(),
        CLIPVisionAdapter(),
        CLIPVisionProjectionAdapter(),
        MixtralAdapter(),
        QwenMoEAdapter(),
        GPT2Adapter(),
        QwenVLAdapter(),
        QwenVisionTowerAdapter(),
        TimmViTAdapter(),
    ]


@hookimpl
def nmperm_solvers() -> dict:
    return dict(HEURISTICS)


@hookimpl
def nmperm_objectives() -> list:
    return list(BUILTIN_OBJECTIVES)
