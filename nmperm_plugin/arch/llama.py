"""Llama-family adapter: Llama, Mistral, Qwen2 (attention bias), Qwen3 (q/k norms), SmolLM."""

from __future__ import annotations

import torch
from torch import nn

from ..ops import GatherLinear, GatherNorm, permute_embedding_, permute_inputs_, permute_outputs_
from .base import Adapter, Site


def _module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


class LlamaAdapter(Adapter):
    """Sites per SPEC 3: ``mlp_out`` (free), ``attn_out`` (per KV head in exact mode), ``hidden``."""

    name = "llama"
    model_types = ("llama", "mistral", "qwen2", "qwen3")

    def matches(self, model: nn.Module) -> bool:
        config = getattr(model, "config", None)
        return getattr(config, "model_type", None) in self.model_types and hasattr(model, "model")

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.layers

    def _head_layout(self, model: nn.Module) -> tuple[int, int, int]:
        config = model.config
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return heads, kv_heads, head_dim

    def sites(self, model: nn.Module, fold: str) -> list[Site]:
        heads, kv_heads, head_dim = self._head_layout(model)
        hidden = model.config.hidden_size
        inter = model.config.intermediate_size
        sites: list[Site] = []
        if fold == "exact":
            readers = [
                f"model.layers.{i}.{name}"
                for i in range(len(self.decoder_layers(model)))
                for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
            ]
            sites.append(Site("hidden", "hidden", tuple(readers), hidden, None))
        for i in range(len(self.decoder_layers(model))):
            p = f"model.layers.{i}"
            if fold == "gather":
                qkv = tuple(f"{p}.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj"))
                sites.append(Site(f"{p}.attn_in", "attn_in", qkv, hidden, i))
            tied = tuple(h // (heads // kv_heads) for h in range(heads)) if fold == "exact" else None
            sites.append(Site(f"{p}.attn_out", "attn_out", (f"{p}.self_attn.o_proj",), heads * head_dim, i, tied))
            if fold == "gather":
                gate_up = (f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj")
                sites.append(Site(f"{p}.mlp_in", "mlp_in", gate_up, hidden, i))
            sites.append(Site(f"{p}.mlp_out", "mlp_out", (f"{p}.mlp.down_proj",), inter, i))
        return sites

    def fold_exact(self, model: nn.Module, site: Site, perm: torch.Tensor) -> None:
        if site.kind == "mlp_out":
            mlp = _module(model, f"model.layers.{site.layer}.mlp")
            permute_outputs_(mlp.gate_proj, perm)
            permute_outputs_(mlp.up_proj, perm)
            permute_inputs_(mlp.down_proj, perm)
        elif site.kind == "attn_out":
            self._fold_attn_out(model, site, perm)
        elif site.kind == "hidden":
            self._fold_hidden(model, perm)
        else:
            raise ValueError(f"site {site.name} ({site.kind}) cannot be folded exactly; use fold='gather'")

    def _fold_attn_out(self, model: nn.Module, site: Site, perm: torch.Tensor) -> None:
        heads, kv_heads, head_dim = self._head_layout(model)
        if site.tied_heads is None:
            raise ValueError(f"{site.name}: an untied attn_out permutation needs fold='gather'")
        within = perm.reshape(heads, head_dim) - torch.arange(heads)[:, None] * head_dim  # [heads, head_dim]
        group = heads // kv_heads
        v_perm = (within[::group] + torch.arange(kv_heads)[:, None] * head_dim).flatten()
        attn = _module(model, f"model.layers.{site.layer}.self_attn")
        permute_outputs_(attn.v_proj, v_perm)
        permute_inputs_(attn.o_proj, perm)

    def _fold_hidden(self, model: nn.Module, perm: torch.Tensor) -> None:
        permute_embedding_(model.model.embed_tokens, perm)
        for layer in self.decoder_layers(model):
            permute_outputs_(layer.input_layernorm, perm)
            permute_outputs_(layer.post_attention_layernorm, perm)
            for linear in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                permute_inputs_(linear, perm)
            permute_inputs_(layer.mlp.gate_proj, perm)
            permute_inputs_(layer.mlp.up_proj, perm)
            permute_outputs_(layer.self_attn.o_proj, perm)
            permute_outputs_(layer.mlp.down_proj, perm)
        permute_outputs_(model.model.norm, perm)
        lm_head = model.get_output_embeddings()
        if lm_head.weight is not model.model.embed_tokens.weight:  # tied: already permuted with the embedding
            permute_inputs_(lm_head, perm)

    def folds_exactly(self, site: Site, fold: str) -> bool:
        """Exact: every site. Gather: only ``mlp_out`` (the others are per-layer gathers)."""
        return fold == "exact" or site.kind == "mlp_out"

    def apply_gather(self, model: nn.Module, site: Site, perm: torch.Tensor) -> None:
        layer = self.decoder_layers(model)[site.layer] if site.layer is not None else None
        if site.kind == "attn_in":
            layer.input_layernorm = GatherNorm(layer.input_layernorm, perm)
            for linear in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                permute_inputs_(linear, perm)
        elif site.kind == "mlp_in":
            layer.post_attention_layernorm = GatherNorm(layer.post_attention_layernorm, perm)
            permute_inputs_(layer.mlp.gate_proj, perm)
            permute_inputs_(layer.mlp.up_proj, perm)
        elif site.kind == "attn_out" and site.tied_heads is None:
            permute_inputs_(layer.self_attn.o_proj, perm)
            layer.self_attn.o_proj = GatherLinear(layer.self_attn.o_proj, perm)
        else:
            self.fold_exact(model, site, perm)
