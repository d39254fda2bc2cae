"""A declarative base for decoder-only Transformers: name the modules, get the sites and folds (SPEC 3).

A family is described by where its modules are: the decoder layers, the linears that read the
attention and MLP inputs, the ones that write back to the residual stream, the norms, the embeddings
and the final norm. :class:`DecoderAdapter` derives the permutation sites, the exact folds and the
run-time gathers from those names; a family whose layout differs (fused projections, input/output
projections around the decoder) overrides one small method.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig

from ..core.ops import GatherLinear, GatherNorm, permute_embedding_, permute_inputs_, permute_outputs_
from .base import Adapter, Site
from .head import TokenHead


def find(root: nn.Module, path: str) -> nn.Module | None:
    """The submodule at dotted ``path``, or None when it is absent (or set to None)."""
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def replace(root: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at dotted ``path`` of ``root``."""
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def permute_norm_(norm: nn.Module | None, perm: torch.Tensor) -> None:
    """Reorder a norm's weight and bias (a norm without affine parameters has nothing to reorder).

    Exact for RMSNorm (``x * w`` and Gemma's ``x * (1 + w)``) and LayerNorm: the statistic is order-independent."""
    if norm is not None and getattr(norm, "weight", None) is not None:
        permute_outputs_(norm, perm)


@dataclass(frozen=True)
class MLPBranch:
    """One feed-forward path of a decoder layer (its MLP, an expert, a shared expert), layer-relative:
    ``down`` writes back to the residual stream and is an ``mlp_out`` site of its own, named
    ``site``; ``rows`` are the linears it folds into (their rows, combined elementwise)."""

    site: str
    down: str
    rows: tuple[str, ...]


class DecoderAdapter(Adapter):
    """Sites and folds of a decoder-only Transformer from the names of its modules.

    Layer-relative paths: ``attn_in`` (the linears reading the attention input), ``value`` (the
    linear holding the value rows, at :meth:`value_offset` when fused with q and k), ``attn_out``,
    ``mlp_in`` (reading the MLP input, rows combined elementwise), ``mlp_out``, ``attn_norm`` and
    ``mlp_norm`` (the norms feeding ``attn_in`` and ``mlp_in``: gathers in ``fold: gather``),
    ``residual_norms`` (other norms on the residual stream, e.g. Gemma's post-norms). Model-relative:
    ``layers``, ``embeddings`` (columns carry the residual stream) and ``final_norms``. A layer with
    several feed-forward paths (mixture-of-experts) overrides :meth:`mlp_branches` and
    :meth:`mlp_routers` (weights that read the MLP input and are not pruned: routers, gates).

    Sites (SPEC 3): exact has one global ``hidden`` site plus per layer ``attn_out`` (tied per KV
    head) and ``mlp_out``; gather has per layer ``attn_in``, untied ``attn_out``, ``mlp_in`` and
    ``mlp_out``.
    """

    model_types: tuple[str, ...] = ()
    layers = "model.layers"
    attn_in: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    value = "self_attn.v_proj"
    attn_out = "self_attn.o_proj"
    mlp_in: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")
    mlp_out = "mlp.down_proj"
    attn_norm = "input_layernorm"
    mlp_norm = "post_attention_layernorm"
    residual_norms: tuple[str, ...] = ()
    embeddings: tuple[str, ...] = ("model.embed_tokens",)
    final_norms: tuple[str, ...] = ("model.norm",)

    # -- what the model is ------------------------------------------------------------------------
    def matches(self, model: nn.Module) -> bool:
        config = getattr(model, "config", None)
        return getattr(config, "model_type", None) in self.model_types and find(model, self.layers) is not None

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def text_config(self, model: nn.Module) -> PretrainedConfig:
        """The config holding the decoder's sizes (here ``model.config``; a vision-language model's
        ``text_config``)."""
        return model.config

    def _head_layout(self, model: nn.Module) -> tuple[int, int, int]:
        config = self.text_config(model)
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return heads, kv_heads, head_dim

    def value_offset(self, model: nn.Module) -> int:
        """The first value row of :attr:`value` (0 unless q, k and v are one fused linear)."""
        return 0

    def mlp_branches(self, layer: nn.Module) -> list[MLPBranch]:
        """The feed-forward paths of ``layer``, each an ``mlp_out`` site (here: its one MLP)."""
        return [MLPBranch("mlp_out", self.mlp_out, self.mlp_in)]

    def mlp_readers(self, layer: nn.Module) -> tuple[str, ...]:
        """The pruned linears of ``layer`` that read the MLP input (every branch's rows)."""
        return tuple(name for branch in self.mlp_branches(layer) for name in branch.rows)

    def mlp_routers(self, layer: nn.Module) -> tuple[str, ...]:
        """Modules of ``layer`` with a ``[out, in]`` weight that read the MLP input but are not pruned
        (a router, a shared-expert gate): their columns follow the MLP input's permutation."""
        return ()

    def mlp_in_rows(self, perm: torch.Tensor) -> torch.Tensor:
        """The row permutation of each ``mlp_in`` linear for an ``mlp_out`` permutation ``perm``
        (fused gate and up halves override this)."""
        return perm

    # -- sites ------------------------------------------------------------------------------------
    def sites(self, model: nn.Module, fold: str) -> list[Site]:
        with self.linear_form(model):
            return self._sites(model, fold)

    def _sites(self, model: nn.Module, fold: str) -> list[Site]:
        heads, kv_heads, head_dim = self._head_layout(model)
        hidden = self.text_config(model).hidden_size
        layers = self.decoder_layers(model)
        sites: list[Site] = []
        if fold == "exact":
            readers = [f"{self.layers}.{i}.{n}" for i, layer in enumerate(layers) for n in self._readers(layer)]
            sites.append(Site("hidden", "hidden", tuple(readers), hidden, None))
        for i, layer in enumerate(layers):
            p = f"{self.layers}.{i}"
            if fold == "gather":
                sites.append(Site(f"{p}.attn_in", "attn_in", tuple(f"{p}.{n}" for n in self.attn_in), hidden, i))
            tied = tuple(h // (heads // kv_heads) for h in range(heads)) if fold == "exact" else None
            sites.append(Site(f"{p}.attn_out", "attn_out", (f"{p}.{self.attn_out}",), heads * head_dim, i, tied))
            if fold == "gather":
                readers = tuple(f"{p}.{n}" for n in self.mlp_readers(layer))
                sites.append(Site(f"{p}.mlp_in", "mlp_in", readers, hidden, i))
            for branch in self.mlp_branches(layer):
                inter = layer.get_submodule(branch.down).in_features
                sites.append(Site(f"{p}.{branch.site}", "mlp_out", (f"{p}.{branch.down}",), inter, i))
        return sites

    def _readers(self, layer: nn.Module) -> tuple[str, ...]:
        """The pruned linears of ``layer`` that read the residual stream (exact ``hidden``)."""
        return self.attn_in + self.mlp_readers(layer)

    # -- exact folds ------------------------------------------------------------------------------
    def fold_exact(self, model: nn.Module, site: Site, perm: torch.Tensor) -> None:
        with self.linear_form(model):
            self._fold_exact(model, site, perm)

    def _fold_exact(self, model: nn.Module, site: Site, perm: torch.Tensor) -> None:
        if site.kind == "mlp_out":
            layer = self.decoder_layers(model)[site.layer]
            p = f"{self.layers}.{site.layer}."
            branch = next(b for b in self.mlp_branches(layer) if p + b.down == site.linears[0])
            rows = self.mlp_in_rows(perm)
            for name in branch.rows:
                permute_outputs_(layer.get_submodule(name), rows)
            permute_inputs_(layer.get_submodule(branch.down), perm)
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
        layer = self.decoder_layers(model)[site.layer]
        value = layer.get_submodule(self.value)
        offset = self.value_offset(model)
        if offset or value.out_features != len(v_perm):  # fused: q and k rows stay, the value rows move
            rows = torch.arange(value.out_features)
            rows[offset : offset + len(v_perm)] = offset + v_perm
            v_perm = rows
        permute_outputs_(value, v_perm)
        permute_inputs_(layer.get_submodule(self.attn_out), perm)

    def _fold_hidden(self, model: nn.Module, perm: torch.Tensor) -> None:
        for layer in self.decoder_layers(model):
            for norm in (self.attn_norm, self.mlp_norm, *self.residual_norms):
                permute_norm_(layer.get_submodule(norm), perm)
            for name in self._readers(layer) + self.mlp_routers(layer):
                permute_inputs_(layer.get_submodule(name), perm)
            for name in (self.attn_out, *(branch.down for branch in self.mlp_branches(layer))):
                permute_outputs_(layer.get_submodule(name), perm)
        self.fold_residual_ends(model, perm)

    def fold_residual_ends(self, model: nn.Module, perm: torch.Tensor) -> None:
        """Where the residual stream starts and ends: embedding columns, final norms, the head's columns."""
        embeddings = [e for e in (find(model, n) for n in self.embeddings) if e is not None]
        for embedding in embeddings:
            permute_embedding_(embedding, perm)
        for name in self.final_norms:
            permute_norm_(find(model, name), perm)
        head = model.get_output_embeddings()
        if head is not None and not any(head.weight is e.weight for e in embeddings):  # tied: already permuted
            permute_inputs_(head, perm)

    def head(self, model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """Last decoder layer's output ``[B, T, D]`` -> logits: the final norms, the output embeddings,
        then the final logit soft-capping where the config has one (Gemma: ``cap * tanh(logits / cap)``)."""
        norms = [n for n in (find(model, name) for name in self.final_norms) if n is not None]
        lm_head, cap = model.get_output_embeddings(), getattr(model.config, "final_logit_softcapping", None)

        def head(hidden: torch.Tensor) -> torch.Tensor:
            for norm in norms:
                hidden = norm(hidden)
            logits = lm_head(hidden)
            return logits if cap is None else torch.tanh(logits / cap) * cap

        return head

    def token_head(self, model: nn.Module, head: Callable[[torch.Tensor], torch.Tensor]) -> TokenHead | None:
        """A language model's head, chunked over positions (its logits are never whole), unless the
        family has losses of its own (a vision model's classes or features: None)."""
        kind = type(self)
        own_losses = (kind.task_loss, kind.output_distillation) != (Adapter.task_loss, Adapter.output_distillation)
        output = getattr(model, "get_output_embeddings", lambda: None)()
        if own_losses or output is None:
            return None
        return TokenHead(head, output.weight.shape[0])

    def model_inputs(self, sample: Mapping[str, torch.Tensor]) -> dict:
        """The sample's inputs without its labels, and no key/value cache (calibration runs whole sequences)."""
        return super().model_inputs(sample) | {"use_cache": False}

    def labels(self, sample: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """The sample's ``labels``, else its own ``input_ids``: a causal LM learns the next token."""
        return sample.get("labels", sample.get("input_ids"))

    def folds_exactly(self, site: Site, fold: str) -> bool:
        """Exact: every site. Gather: only ``mlp_out`` (the others are per-layer gathers)."""
        return fold == "exact" or site.kind == "mlp_out"

    # -- run-time gathers -------------------------------------------------------------------------
    def apply_gather(self, model: nn.Module, site: Site, perm: torch.Tensor) -> None:
        with self.linear_form(model):
            self._apply_gather(model, site, perm)

    def _apply_gather(self, model: nn.Module, site: Site, perm: torch.Tensor) -> None:
        layer = self.decoder_layers(model)[site.layer] if site.layer is not None else None
        if site.kind in ("attn_in", "mlp_in"):
            mlp = self.mlp_readers(layer) + self.mlp_routers(layer) if site.kind == "mlp_in" else ()
            norm, readers = (self.attn_norm, self.attn_in) if site.kind == "attn_in" else (self.mlp_norm, mlp)
            replace(layer, norm, GatherNorm(layer.get_submodule(norm), perm))
            for name in readers:
                permute_inputs_(layer.get_submodule(name), perm)
        elif site.kind == "attn_out" and site.tied_heads is None:
            out = layer.get_submodule(self.attn_out)
            permute_inputs_(out, perm)
            replace(layer, self.attn_out, GatherLinear(out, perm))
        else:
            self._fold_exact(model, site, perm)
