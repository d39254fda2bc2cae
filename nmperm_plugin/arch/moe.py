"""Mixture-of-experts decoders: Mixtral, Qwen2-MoE (with its shared expert and shared-expert gate),
Qwen3-MoE. Attention is Llama's; each layer's MLP is a router (``mlp.gate``, weight
``[experts, D]``) choosing top-k experts per token, or (Qwen MoE's ``mlp_only_layers``,
``decoder_sparse_step``) a dense MLP.

transformers 5 stores a layer's experts fused: ``mlp.experts.gate_up_proj`` ``[E, 2I, D]`` (each
expert's gate rows, then its up rows) and ``mlp.experts.down_proj`` ``[E, D, I]``. In the adapter's
:meth:`~MoEAdapter.linear_form` they are per-expert ``nn.Linear`` views, ``mlp.experts.{e}.gate_proj``
/ ``up_proj`` / ``down_proj``, the names a saved checkpoint uses (Mixtral saves them as
``block_sparse_moe.experts.{e}.w1`` / ``w3`` / ``w2``). Sites: every expert's ``down_proj`` is an
``mlp_out`` site of its own, folded into that expert's gate and up rows (``act(gate) * up`` is
elementwise), and so is the shared expert's; the router and the shared-expert gate read the MLP
input: in ``fold: exact`` their columns take the global ``hidden`` permutation, in ``fold: gather``
the layer's ``mlp_in`` one. Routing is unchanged by either: the router's logits are the same.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from .decoder import DecoderAdapter, MLPBranch, find
from .views import LinearViews, linear_view, write_back

EXPERTS = "mlp.experts"


class ExpertMLP(nn.Module):
    """One expert as three linears: ``down_proj(act(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, gate_proj: nn.Linear, up_proj: nn.Linear, down_proj: nn.Linear) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj


class ExpertLinears(nn.Module):
    """A fused experts module as one :class:`ExpertMLP` of weight views per expert (children ``0``,
    ``1``, ...), computing what the fused module computes (transformers' eager loop: each expert on
    the tokens routed to it, scaled by the routing weight, summed)."""

    def __init__(self, fused: nn.Module) -> None:
        super().__init__()
        size, gate_up, down = fused.intermediate_dim, fused.gate_up_proj.detach(), fused.down_proj.detach()
        for index, (gu, d) in enumerate(zip(gate_up, down, strict=True)):
            self.add_module(str(index), ExpertMLP(linear_view(gu[:size]), linear_view(gu[size:]), linear_view(d)))
        self.num_experts, self.intermediate_dim, self.act_fn = fused.num_experts, size, fused.act_fn

    def experts(self) -> list[ExpertMLP]:
        return [self.get_submodule(str(index)) for index in range(self.num_experts)]

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        output = torch.zeros_like(hidden_states)
        for index, expert in enumerate(self.experts()):
            token, slot = torch.where(top_k_index == index)
            if len(token):
                x = hidden_states[token]
                y = expert.down_proj(self.act_fn(expert.gate_proj(x)) * expert.up_proj(x))
                output.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(output.dtype))
        return output


def restore_experts(fused: nn.Module, linears: ExpertLinears) -> None:
    """Write the per-expert weights that a fold replaced back into the fused tensors."""
    size = fused.intermediate_dim
    for index, expert in enumerate(linears.experts()):
        write_back(fused.gate_up_proj.data[index, :size], expert.gate_proj.weight.data)
        write_back(fused.gate_up_proj.data[index, size:], expert.up_proj.weight.data)
        write_back(fused.down_proj.data[index], expert.down_proj.weight.data)


def gated_branch(path: str) -> MLPBranch:
    """The ``mlp_out`` site of the gated MLP at ``path``: ``down_proj`` into ``gate_proj`` and ``up_proj``."""
    return MLPBranch(f"{path}.mlp_out", f"{path}.down_proj", (f"{path}.gate_proj", f"{path}.up_proj"))


class MoEAdapter(LinearViews, DecoderAdapter):
    """Sites and folds of a decoder whose layers hold fused experts at ``mlp.experts`` (in the linear
    form: per-expert ``nn.Linear`` views, :class:`ExpertLinears`)."""

    shared_expert = "mlp.shared_expert"  # Qwen2-MoE: a dense MLP beside the experts...
    shared_expert_gate = "mlp.shared_expert_gate"  # ...scaled by sigmoid(this linear of the MLP input)
    stand_in, restore = ExpertLinears, restore_experts

    def linear_paths(self, model: nn.Module) -> list[str]:
        """Every layer's fused experts (a dense layer has none)."""
        return [f"{self.layers}.{i}.{EXPERTS}" for i in range(len(self.decoder_layers(model)))]

    def mlp_branches(self, layer: nn.Module) -> list[MLPBranch]:
        """Every expert, then the shared expert (when the layer has one); a dense layer's MLP."""
        experts = find(layer, EXPERTS)
        if experts is None:
            return super().mlp_branches(layer)
        paths = [f"{EXPERTS}.{e}" for e in range(experts.num_experts)]
        paths += [self.shared_expert] * (find(layer, self.shared_expert) is not None)
        return [gated_branch(path) for path in paths]

    def mlp_routers(self, layer: nn.Module) -> tuple[str, ...]:
        """The router and (Qwen2-MoE) the shared-expert gate: they read the MLP input, unpruned."""
        if find(layer, EXPERTS) is None:
            return ()
        return tuple(name for name in ("mlp.gate", self.shared_expert_gate) if find(layer, name) is not None)


class MixtralAdapter(MoEAdapter):
    """Mixtral (``MixtralForCausalLM``); its checkpoints name the experts' linears ``w1``/``w3``/``w2``."""

    name = "mixtral"
    model_types = ("mixtral",)
    _saved = {"gate": "w1", "up": "w3", "down": "w2"}

    def checkpoint_key(self, name: str) -> str:
        """``model.layers.{i}.mlp.experts.{e}.down_proj`` is saved as ``...block_sparse_moe.experts.{e}.w2.weight``."""
        match = re.fullmatch(r"(.*)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj", name)
        if match is None:
            return super().checkpoint_key(name)
        return f"{match[1]}.block_sparse_moe.experts.{match[2]}.{self._saved[match[3]]}.weight"


class QwenMoEAdapter(MoEAdapter):
    """Qwen2-MoE (``Qwen2MoeForCausalLM``, shared expert) and Qwen3-MoE (``Qwen3MoeForCausalLM``, q/k norms)."""

    name = "qwen_moe"
    model_types = ("qwen2_moe", "qwen3_moe")
