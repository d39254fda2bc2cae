"""Pruning the chosen parts of a vision-language model: Qwen2.5-VL's and Qwen2-VL's vision tower, text
decoder, or both (:func:`permute_parts_`), with one sidecar for the whole model.

The tower and the decoder are two runs of :func:`~nmperm_plugin.api.permute_` (the tower's with
:class:`~nmperm_plugin.arch.qwen_vl_vision.QwenVisionTowerAdapter` on ``model.model.visual``), the
tower first so that the decoder calibrates on the pruned tower's image features; ``ignore``
regexes are written against the whole model's names for both.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import torch
from torch import nn

from .api import permute_
from .arch.qwen_vl import TOWER, VISION, QwenVLAdapter
from .calibration import CalibrationData
from .config import PermuteConfig
from .pipeline import PruneResult
from .sidecar import Sidecar

PARTS = ("vision", "text")  # what permute_parts_ prunes, in this order


def tower_config(model: nn.Module, config: PermuteConfig) -> PermuteConfig:
    """``config`` for the run over the vision tower alone: its ``ignore`` regexes, written for the whole
    model's names (``model\\.visual\\.blocks\\.0\\.``), matched against the tower's linears there
    and passed on as those linears' tower-relative names (``^blocks\\.0\\.attn\\.qkv$``)."""
    tower = model.get_submodule(TOWER)
    linears = {n for site in VISION.sites(tower, config.fold) for n in site.linears}
    kept = sorted(n for n in linears if any(re.search(p, f"{TOWER}.{n}") for p in config.ignore))
    return dataclasses.replace(config, ignore=tuple(f"^{re.escape(n)}$" for n in kept))


def in_model(sidecar: Sidecar) -> Sidecar:
    """A sidecar of the vision tower's run in the whole model's names and architecture."""
    prefixed = {site: f"{TOWER}.{site}" for site in sidecar.permutations}
    return dataclasses.replace(
        sidecar,
        architecture=QwenVLAdapter.name,
        permutations={prefixed[site]: perm for site, perm in sidecar.permutations.items()},
        frames={f"{TOWER}.{n}": None if site is None else prefixed[site] for n, site in sidecar.frames.items()},
    )


def merge_sidecars(vision: Sidecar, text: Sidecar) -> Sidecar:
    """One sidecar for a model whose tower and text decoder were pruned by two runs of one
    configuration: both parts' permutations and frames; the text run's figures and verification, with
    the tower's under ``vision_tower``."""
    same = ("pattern", "fold", "scorer")
    differ = [k for k in same if getattr(vision, k) != getattr(text, k)]
    if differ:
        raise ValueError(f"the tower's and the text decoder's runs differ in {', '.join(differ)}: merge one config's")
    return dataclasses.replace(
        text,
        permutations=vision.permutations | text.permutations,
        frames=vision.frames | text.frames,
        figures=text.figures | {"vision_tower": vision.figures | {"method": vision.method}},
        verification=text.verification | {"vision_tower": vision.verification},
    )


def permute_parts_(
    model: nn.Module,
    calibration: CalibrationData,
    config: PermuteConfig,
    parts: Sequence[str] = ("text",),
    device: torch.device | str | None = None,
) -> tuple[Sidecar, dict[str, PruneResult]]:
    """Permute and prune the chosen ``parts`` of a Qwen2.5-VL or Qwen2-VL model in place: ``"text"``
    (the decoder, as the paper; what ``permute_(model, ...)`` does) and/or ``"vision"`` (the tower,
    ``permute_`` on ``model.model.visual``, run first so that the decoder calibrates on the pruned
    tower's image features). ``config.ignore`` regexes match the whole model's names in both
    (``model\\.visual\\.blocks\\.[0-3]\\.`` keeps the first four tower blocks dense); ``calibration``:
    batches of images and text as for ``permute_`` (the tower reads their ``pixel_values`` and
    ``image_grid_thw``). Returns one sidecar for the whole model (:func:`merge_sidecars`) and each
    part's result by part.

    Example::

        sidecar, results = permute_parts_(model, batches, PermuteConfig(), parts=("vision", "text"))
    """
    unknown = [part for part in parts if part not in PARTS]
    if unknown or not parts:
        raise ValueError(f"parts {list(parts)!r}: choose one or both of {', '.join(map(repr, PARTS))}")
    if not QwenVLAdapter().matches(model):
        raise ValueError(
            f"permute_parts_ takes a Qwen2.5-VL or Qwen2-VL model (a {type(model).__name__} was given); "
            "prune a bare vision tower with permute_(tower, batches, config)"
        )
    calibration = calibration if isinstance(calibration, torch.Tensor) else list(calibration)  # read twice
    sidecars, results = {}, {}
    if "vision" in parts:
        tower = model.get_submodule(TOWER)
        sidecar, results["vision"] = permute_(tower, calibration, tower_config(model, config), device)
        sidecars["vision"] = in_model(sidecar)
    if "text" in parts:
        sidecars["text"], results["text"] = permute_(model, calibration, config, device)
    if len(sidecars) == 2:
        return merge_sidecars(sidecars["vision"], sidecars["text"]), results
    return next(iter(sidecars.values())), results
