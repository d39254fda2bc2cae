"""Pruning the chosen parts of a vision-language model: Qwen2.5-VL's and Qwen2-VL's vision tower, text
decoder, or both (:func:`permute_parts_`), with one sidecar for the whole model.

The tower and the decoder are two runs of :func:`~nmperm_plugin.learn.pipeline.permute_model_` (the tower's with
:class:`~nmperm_plugin.arch.qwen_vl_vision.QwenVisionTowerAdapter` on ``model.model.visual``), the
tower first so that the decoder calibrates on the pruned tower's image features; ``ignore``
regexes are written against the whole model's names for both.

``nmperm prune --parts`` and ``LearnedPermutationModifier(parts=...)`` go through
:func:`permute_chosen_` (any model: a model without a vision tower is pruned whole, ``parts``
``("text",)``), :func:`check_parts` (refused before any work) and :func:`fingerprint` (a resumable
run's setup names its parts).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence

import torch
from torch import nn

from ..arch.qwen_vl import TOWER, VISION, QwenVLAdapter, renamed
from ..config import PermuteConfig
from ..data.calibration import CalibrationData
from ..io.sidecar import Sidecar
from ..runtime import distributed, resume
from .pipeline import PruneResult, dense_linears, permute_model_

PARTS = ("vision", "text")  # what permute_parts_ prunes, in this order
DEFAULT_PARTS = ("text",)  # the paper's: the text decoder (of any other model: all of it)


def parse_parts(parts: str | Sequence[str]) -> tuple[str, ...]:
    """The chosen parts, ``"vision,text"`` or a sequence, in :data:`PARTS` order without repeats;
    ``ValueError`` for an unknown part or none."""
    chosen = [p.strip() for p in parts.split(",")] if isinstance(parts, str) else list(parts)
    unknown = [part for part in chosen if part not in PARTS]
    if unknown or not chosen:
        raise ValueError(f"parts {chosen!r}: choose one or both of {', '.join(map(repr, PARTS))}")
    return tuple(part for part in PARTS if part in chosen)


def has_vision_tower(model: nn.Module | str) -> bool:
    """Whether ``model`` (a module, or a config's ``model_type``) is a Qwen2.5-VL or Qwen2-VL model,
    whose vision tower :func:`permute_parts_` can prune."""
    if isinstance(model, str):
        return model in QwenVLAdapter.model_types
    return QwenVLAdapter().matches(model)


def check_parts(parts: Sequence[str], model: nn.Module | str, option: str = "parts") -> None:
    """Refuse ``"vision"`` among ``parts`` for a model (a module or its ``model_type``) without a vision
    tower nmperm prunes, saying what to do instead."""
    if "vision" not in parts or has_vision_tower(model):
        return
    kind = model if isinstance(model, str) else type(model).__name__
    raise ValueError(
        f"{option} {','.join(parts)}: a {kind} model has no vision tower that nmperm prunes (only Qwen2.5-VL and "
        f"Qwen2-VL models have: model_type {' or '.join(QwenVLAdapter.model_types)}); any other model is pruned "
        f"whole: leave {option} at its default, text"
    )


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
    parts = parse_parts(parts)
    if not has_vision_tower(model):
        raise ValueError(
            f"permute_parts_ takes a Qwen2.5-VL or Qwen2-VL model (a {type(model).__name__} was given); "
            "prune a bare vision tower with permute_(tower, batches, config)"
        )
    calibration = calibration if isinstance(calibration, torch.Tensor) else list(calibration)  # read twice
    sidecars, results = {}, {}
    if "vision" in parts:
        tower = model.get_submodule(TOWER)
        sidecar, results["vision"] = permute_model_(tower, calibration, tower_config(model, config), device)
        sidecars["vision"] = in_model(sidecar)
    if "text" in parts:
        sidecars["text"], results["text"] = permute_model_(model, calibration, config, device)
    sidecar = (
        merge_sidecars(sidecars["vision"], sidecars["text"]) if len(sidecars) == 2 else next(iter(sidecars.values()))
    )
    sidecar.dense = dense_linears(model, sidecar)  # the whole model's linears: a part not pruned is dense
    return sidecar, results


def in_model_result(result: PruneResult) -> PruneResult:
    """A :class:`PruneResult` of the vision tower's run in the whole model's names (its learning curves
    under ``vision_tower/<label>``)."""
    name = f"{TOWER}.{{}}".format
    return dataclasses.replace(
        result,
        sites=[renamed(site, name) for site in result.sites],
        perms={name(site): perm for site, perm in result.perms.items()},
        pruned=[name(linear) for linear in result.pruned],
        history={f"vision_tower/{label}": curve for label, curve in result.history.items()},
    )


def merge_results(results: dict[str, PruneResult]) -> PruneResult:
    """One :class:`PruneResult` for the parts of :func:`permute_parts_`, in the whole model's names:
    every part's sites, permutations, pruned linears and learning curves; the last part's retained
    ratios per layer (the text decoder's when it is pruned: the tower's are in the sidecar's
    ``vision_tower`` figures), both parts' seconds."""
    parts = [in_model_result(results["vision"])] if "vision" in results else []
    parts += [results["text"]] if "text" in results else []
    last = parts[-1]
    return dataclasses.replace(
        last,
        sites=[site for part in parts for site in part.sites],
        perms={k: v for part in parts for k, v in part.perms.items()},
        pruned=[linear for part in parts for linear in part.pruned],
        history={k: v for part in parts for k, v in part.history.items()},
        seconds=sum(part.seconds for part in parts),
    )


def permute_chosen_(
    model: nn.Module,
    calibration: CalibrationData,
    config: PermuteConfig,
    parts: Sequence[str] = DEFAULT_PARTS,
    device: torch.device | str | None = None,
) -> tuple[Sidecar, PruneResult]:
    """``permute_`` for the chosen ``parts`` of any model: :func:`permute_parts_` for a Qwen2.5-VL or
    Qwen2-VL model (its result: :func:`merge_results`), ``permute_(model, ...)`` for any other, whose
    ``parts`` must be the default ``("text",)`` (the whole model; ``"vision"`` refused, :func:`check_parts`)."""
    parts = parse_parts(parts)
    check_parts(parts, model)
    if not has_vision_tower(model):
        return permute_model_(model, calibration, config, device)
    sidecar, results = permute_parts_(model, calibration, config, parts, device)
    return sidecar, merge_results(results)


def fingerprint(
    model: nn.Module,
    calibration: CalibrationData,
    config: PermuteConfig,
    parts: Sequence[str] = DEFAULT_PARTS,
    device: torch.device | str = "cpu",
) -> dict:
    """:func:`nmperm_plugin.runtime.resume.fingerprint` of a :func:`permute_chosen_` run, a vision-language
    model's parts among its configuration fields, so that the state of a text-only run is never resumed
    by a run over both parts (one store holds both parts' phases, the tower's first)."""
    found = resume.fingerprint(model, calibration, config, device)
    if has_vision_tower(model):
        found["config"]["parts"] = list(parse_parts(parts))
    return found


def open_state(
    directory,
    model: nn.Module,
    calibration: CalibrationData,
    config: PermuteConfig,
    parts: Sequence[str] = DEFAULT_PARTS,
    device: torch.device | str = "cpu",
    resume_run: bool = True,
    restart_hint: str = "pass resume=False",
) -> resume.ResumeStore:
    """The learning state of a :func:`permute_chosen_` run in ``directory``, opened: with
    ``resume_run``, an interrupted run of the same :func:`fingerprint` continues; every rank must hold
    the same setup (checked)."""
    setup = fingerprint(model, calibration, config, parts, device)
    distributed.check_same("the model, the calibration data or the configuration", json.dumps(setup))
    return resume.ResumeStore(directory, setup, restart_hint=restart_hint).open(resume_run)
