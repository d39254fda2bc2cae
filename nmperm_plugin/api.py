"""The Python entry point, torchao style: ``permute_(model, calibration, PermuteConfig(...))``.

It is the one orchestrator: ``nmperm prune`` and :class:`LearnedPermutationModifier` are front ends
over it. It checks the parts to prune, places the model (on the device, or onloaded one decoder
layer at a time), opens the resumable learning state, and runs the pipeline over the model or over
the chosen parts of a vision-language model.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Literal

import torch
from loguru import logger
from torch import nn

from .config import PermuteConfig
from .data.calibration import CalibrationData
from .io.sidecar import Sidecar
from .learn.parts import DEFAULT_PARTS, check_parts, open_state, parse_parts, permute_chosen_
from .learn.pipeline import PruneResult
from .runtime import resume
from .runtime.onload import execution_device, fits_on, storage_device

Placement = Literal["onload", "auto"]


def permute_(
    model: nn.Module,
    calibration: CalibrationData,
    config: PermuteConfig,
    device: torch.device | str | None = None,
    *,
    parts: Sequence[str] | str = DEFAULT_PARTS,
    state: resume.ResumeStore | str | os.PathLike | None = None,
    placement: Placement = "onload",
) -> tuple[Sidecar, PruneResult]:
    """Permute (and, with ``config.apply_mask``, prune) ``model`` in place and fold the permutations.

    ``calibration`` is ``[num_sequences, seq_len]`` token ids, or an iterable of batches of model
    inputs as a processor returns them (dicts of tensors with the batch first: ``pixel_values``,
    ``input_ids``, ``labels``, ...; :mod:`nmperm_plugin.data.calibration`). With labels (and always for a
    causal LM, whose labels are its next tokens) the learned objectives use the model's own loss.

    ``device``: where to compute (None: where the model's weights are). ``placement``: ``"onload"``
    keeps the weights where they are and copies one decoder layer at a time to ``device`` (layer
    checkpointing on); ``"auto"`` (what ``nmperm prune`` does) moves the whole model to ``device``
    when its weights take at most half the memory free there, and onloads otherwise.
    ``parts``: what to prune of a Qwen2.5-VL / Qwen2-VL model (``"text"``, ``"vision"`` or both,
    :mod:`nmperm_plugin.learn.parts`); any other model is pruned whole and takes the default only.
    ``state``: a learning-state directory (ending in ``.nmperm-state``) or an opened
    :class:`~nmperm_plugin.runtime.resume.ResumeStore`: an interrupted run with the same model, data
    and configuration continues where it stopped, and progress is saved as it goes.

    Returns the sidecar to save beside the model (permutations, frames, figures) and the raw result
    (learning curves). Raises if folding changed the model's function beyond its precision's
    tolerance (relative to the outputs' scale).

    Example::

        from nmperm_plugin import PermuteConfig, permute_
        sidecar, result = permute_(model, input_ids, PermuteConfig(pattern="2:4", scorer="wanda"))
        sidecar, result = permute_(vit, [{"pixel_values": x, "labels": y}], PermuteConfig())
        sidecar, result = permute_(model, input_ids, PermuteConfig(), "cuda", state="out.nmperm-state")
    """
    parts = parse_parts(parts)
    check_parts(parts, model)
    if placement not in ("onload", "auto"):
        raise ValueError(f"placement {placement!r}: choose 'onload' or 'auto'")
    device = execution_device(device)
    if placement == "auto" and device is not None and storage_device(model) != device:
        if fits_on(model, device):
            model.to(device)
        else:
            logger.info(f"nmperm: the model does not fit {device} beside the learning: its layers are onloaded in turn")
    calibration = calibration if isinstance(calibration, torch.Tensor) else list(calibration)  # read more than once
    with _resumable(state, model, calibration, config, parts, device):
        return permute_chosen_(model, calibration, config, parts, device)


def _resumable(state, model, calibration, config, parts, device):
    """The context that makes the run resumable: ``state`` opened (a path) or used as it is (a store)."""
    if state is None:
        return nullcontext()
    if not isinstance(state, resume.ResumeStore):
        state = open_state(state, model, calibration, config, parts, device or storage_device(model))
    return resume.using(state)
