"""Glue between llm-compressor and the permutation algorithm (used by :mod:`nmperm_plugin.llmcompressor.modifier`).

Plain functions: calibration ids from the pipeline's dataloader, checks of the recipe around the
modifier, and the ``save_pretrained`` wrapper that writes the sidecar beside every checkpoint and
keeps the checkpoint loadable by vLLM (no ``sparsity_config`` that declares a 2:4 structure).
"""

from __future__ import annotations

import functools
import json
import re
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from loguru import logger
from torch import nn

from .. import compat
from ..core.nm import NMPattern, is_nm
from ..data.calibration import samples_of
from ..io.checks import weight_checksums
from ..io.sidecar import Sidecar
from ..io.verify import checkpoint_key_of, linear_form, record_claim, verify_model
from ..runtime.resume import ResumeStore

STATE_ATTR = "_nmperm_state"
GATHER_REFUSAL = (
    "refusing to save a fold 'gather' model as a standard checkpoint: its per-layer permutations are not "
    "folded into the weights, so the stored weights are N:M only under the permutations in nmperm.json and "
    "vLLM (or any stock loader) would serve them as ordinary dense weights with no N:M structure. Use "
    "fold: exact for a vLLM-ready checkpoint, or set allow_gather_checkpoint: true to save it anyway as a "
    "non-standard checkpoint for `nmperm export` (torchao, PyTorch only), which re-applies the gathers"
)


@dataclass
class PermutedState:
    """What the modifier leaves on the model for the save hook: the sidecar and the pruned linears."""

    sidecar: Sidecar
    pruned: list[str]
    allow_gather_checkpoint: bool = False
    recipe_modifiers: list[str] = field(default_factory=list)
    learning_state: ResumeStore | None = None  # deleted once the model is saved


def permuted_state(model: nn.Module) -> PermutedState | None:
    """The permutation record a :class:`LearnedPermutationModifier` attached to ``model``, if any."""
    return getattr(model, STATE_ATTR, None)


def sidecar_of(model: nn.Module) -> Sidecar | None:
    """The sidecar of a model permuted by :class:`LearnedPermutationModifier` (None if it was not)."""
    state = permuted_state(model)
    return None if state is None else state.sidecar


# -- calibration data -------------------------------------------------------------------------------
def _rows(batch) -> Iterable[torch.Tensor]:
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise ValueError("LearnedPermutationModifier needs calibration batches with 'input_ids' (a text dataset)")
    ids = torch.as_tensor(batch["input_ids"])
    ids = ids[None] if ids.ndim == 1 else ids
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else torch.as_tensor(mask).reshape(ids.shape).bool()
    for row, keep in zip(ids, mask, strict=True):
        yield row[keep].long().cpu()


def calibration_ids(dataloader, max_sequences: int | None = None) -> torch.LongTensor:
    """``[N, T]`` token ids from the pipeline's calibration dataloader (padding removed).

    Sequences of equal length are stacked; otherwise they are concatenated and cut into windows of
    the longest sequence's length. ``max_sequences`` keeps the first ones.
    """
    if dataloader is None:
        raise ValueError("LearnedPermutationModifier needs calibration data: pass dataset=... to oneshot")
    rows = [row for batch in dataloader for row in _rows(batch) if len(row) > 1]
    if not rows:
        raise ValueError("the calibration dataloader gave no sequence of 2 or more tokens")
    lengths = {len(row) for row in rows}
    if len(lengths) == 1:
        ids = torch.stack(rows)
    else:
        length = min(max(lengths), sum(len(r) for r in rows))
        stream = torch.cat(rows)
        ids = stream[: len(stream) // length * length].view(-1, length)
        logger.info(f"nmperm: {len(rows)} calibration sequences of unequal length regrouped as {tuple(ids.shape)}")
    return ids[:max_sequences] if max_sequences else ids


def has_images(batch: Mapping) -> bool:
    """Whether a calibration batch holds images or videos (``pixel_values``, ``pixel_values_videos``)."""
    return any(str(key).startswith("pixel_values") for key in batch)


def calibration_data(dataloader, max_sequences: int | None = None) -> torch.LongTensor | list[dict]:
    """What ``permute_`` calibrates on from the pipeline's dataloader: token ids (:func:`calibration_ids`)
    when its batches hold ``input_ids`` and no images, else its samples as model-input dicts (an image
    model's ``pixel_values`` with their ``labels``; a vision-language model's ``input_ids`` with
    ``pixel_values`` and ``image_grid_thw``, batch-first), the first ``max_sequences`` of them."""
    if dataloader is None:
        raise ValueError("LearnedPermutationModifier needs calibration data: pass dataset=... to oneshot")
    first = next(iter(dataloader), None)
    if first is None or ("input_ids" in first and not has_images(first)):
        return calibration_ids(dataloader, max_sequences)
    samples = samples_of(dataloader)
    return samples[:max_sequences] if max_sequences else samples


# -- names ------------------------------------------------------------------------------------------
def ignored_linears(model: nn.Module, ignore: list[str]) -> tuple[str, ...]:
    """Regexes for the linears that llm-compressor's ``ignore`` syntax names (exact names, ``re:`` regexes
    matched from the start, class names); the permutation pipeline leaves them dense."""
    if not ignore:
        return ()
    from compressed_tensors.utils import match_targets

    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and match_targets(n, m, ignore)]
    return tuple(f"^{re.escape(name)}$" for name in names)


# -- the recipe around the modifier -----------------------------------------------------------------
def _kind(modifier) -> str | None:
    from llmcompressor.modifiers.quantization import QuantizationMixin

    if isinstance(modifier, compat.sparsity_modifier_base()):
        return "pruner"
    if isinstance(modifier, QuantizationMixin):
        return "quantizer"
    if "Pruning" in type(modifier).__name__:
        return "pruner"
    return None


def check_recipe(modifier, modifiers: list) -> None:
    """Refuse recipes where the permutation would silently not do what the recipe says."""
    mine = [m for m in modifiers if type(m) is type(modifier)]
    if len(mine) > 1:
        raise ValueError("a recipe may hold only one LearnedPermutationModifier (one set of permutations)")
    position = next((i for i, m in enumerate(modifiers) if m is modifier), 0)
    for other in modifiers[:position]:
        if _kind(other):
            raise ValueError(
                f"LearnedPermutationModifier must come before {type(other).__name__} in the recipe: it learns and "
                "folds the permutations of the dense model when the recipe is initialised, before any pruning or "
                "quantization"
            )
    after = modifiers[position + 1 :]
    for other in after:
        if _kind(other) == "pruner":
            _check_pruner(modifier, other)
    pruned = modifier.apply_mask or any(_kind(other) == "pruner" for other in after)
    for other in after:
        if pruned and type(other).__name__ == "GPTQModifier":
            raise ValueError(
                "GPTQModifier after pruning loses the N:M pattern: llm-compressor's GPTQ (since #2860) updates every "
                "weight of a column, the pruned ones included; quantize with QuantizationModifier (round to nearest, "
                "symmetric: a zero stays zero), as recipes/sparsegpt-2of4-learned-w4a16.yaml does"
            )


def _check_pruner(modifier, pruner) -> None:
    name = type(pruner).__name__
    if modifier.fold == "gather":
        raise ValueError(
            f"fold 'gather' keeps weights in the original channel order, so {name} would prune them in the wrong "
            "order and break the N:M structure: the modifier applies its own masks with fold 'gather' "
            f"(apply_mask: true); remove {name} or use fold: exact"
        )
    if modifier.reconstruct:
        raise ValueError(
            f"reconstruct: true applies the learned masks and updates the kept weights for them; {name} after it "
            f"would choose masks of its own and undo both: remove {name} (the modifier prunes), or set reconstruct: "
            "false and apply_mask: false to let the pruner choose the masks on the permuted model"
        )
    structure = str(getattr(pruner, "mask_structure", ""))
    if re.fullmatch(r"\d+:\d+", structure) and structure != "0:0" and structure != modifier.pattern:
        raise ValueError(
            f"LearnedPermutationModifier pattern {modifier.pattern} differs from {name} mask_structure {structure}: "
            "the permutations are learned for one N:M pattern, give both the same"
        )
    if modifier.apply_mask:
        logger.warning(f"nmperm: apply_mask is true and {name} follows: it re-prunes weights that are already N:M")
    if any(not t.startswith("re:") for t in getattr(pruner, "ignore", [])) and "Linear" in getattr(
        pruner, "targets", []
    ):
        logger.warning(
            f"nmperm: {name} ignore {pruner.ignore}: with targets ['Linear'] llm-compressor 0.14 names modules with a "
            "trailing dot ('lm_head.'), so plain names do not match; write regexes such as 're:.*lm_head'"
        )


def check_unpermuted(model: nn.Module) -> None:
    if permuted_state(model) is not None:
        raise ValueError(
            "this model was already permuted by a LearnedPermutationModifier: permuting it again would make its "
            "sidecar wrong; start from the original model"
        )


# -- saving -----------------------------------------------------------------------------------------
def attach(model: nn.Module, state: PermutedState) -> None:
    """Record ``state`` on the model and make ``model.save_pretrained`` write the sidecar too."""
    object.__setattr__(model, STATE_ATTR, state)
    install_save_hook(model)


def install_save_hook(model: nn.Module) -> None:
    """Wrap ``model.save_pretrained`` (outside llm-compressor's compressing wrapper): refuse ``gather``
    models without consent, then save, drop any 2:4 ``sparsity_config`` and write ``nmperm.json``."""
    compat.modify_save_pretrained()(model)  # idempotent; oneshot has done it already
    save = model.save_pretrained
    if getattr(save, "_nmperm", False):
        return
    model_ref = weakref.ref(model)

    @functools.wraps(save)
    def save_pretrained(save_directory, *args, **kwargs):
        model = model_ref()
        state = permuted_state(model)
        sidecar = final_sidecar(model, state) if state is not None else None
        save(save_directory, *args, **kwargs)
        if sidecar is not None:
            strip_sparsity_config(save_directory)
            # the sha256 of every pruned weight as written, which nmperm verify compares (format 2)
            sidecar.checksums = weight_checksums(save_directory, sidecar.frames, checkpoint_key_of(sidecar))
            logger.info(f"nmperm: wrote {sidecar.save(save_directory)}")
            if state.learning_state is not None:
                state.learning_state.remove()

    compat.copy_save_pretrained_flag(save, save_pretrained)
    save_pretrained._nmperm = True
    model.save_pretrained = save_pretrained


def final_sidecar(model: nn.Module, state: PermutedState) -> Sidecar:
    """The sidecar as the checkpoint will hold it: which linears are N:M now (after any downstream pruner)
    and the verification. Raises for ``fold: gather`` without ``allow_gather_checkpoint``."""
    sidecar = state.sidecar
    if sidecar.fold == "gather" and not state.allow_gather_checkpoint:
        raise ValueError(GATHER_REFUSAL)
    pattern = NMPattern.parse(sidecar.pattern)
    if sidecar.fold == "exact":
        with linear_form(model):  # fused experts, GPT-2's Conv1D: [out, in] views of the stored weights
            weights = {name: model.get_submodule(name).weight.detach() for name in state.pruned}
        sidecar.frames = {name: None for name, weight in weights.items() if is_nm(weight, pattern)}
        dense = sorted(set(weights) - set(sidecar.frames))
        sidecar.verification["not_nm"] = dense
        if dense:
            logger.warning(f"nmperm: {len(dense)} permuted linears are not {pattern} (no pruner pruned them)")
        sidecar.masked = bool(sidecar.frames)  # N:M only where a pruner (or apply_mask) made it so
    record_claim(model, sidecar)
    sidecar.figures["recipe_modifiers"] = state.recipe_modifiers
    report = verify_model(model, sidecar)
    sidecar.verification["checks"] = report.checks
    if not report.ok:
        raise RuntimeError(f"the model fails its own sidecar checks, not saving it:\n{report.render()}")
    return sidecar


def strip_sparsity_config(directory: str | Path) -> None:
    """Make sure ``config.json`` declares no sparsity structure (vLLM refuses 2:4 ``sparsity_config``s).

    compressed-tensors 0.19 writes an empty ``sparsity_config`` (or none); anything else is removed.
    """
    path = Path(directory) / "config.json"
    config = json.loads(path.read_text())
    quantization = config.get("quantization_config")
    if not isinstance(quantization, dict) or not quantization.get("sparsity_config"):
        return
    logger.warning(f"nmperm: removing sparsity_config {quantization['sparsity_config']} from {path} (vLLM refuses it)")
    quantization["sparsity_config"] = {}
    if not quantization.get("config_groups"):
        del config["quantization_config"]
    path.write_text(json.dumps(config, indent=2, sort_keys=True))
