"""``nmperm verify``: a checkpoint checked against its sidecar's claim. Every linear the adapter
prunes is listed as pruned or as left dense, every pruned one is N:M (in its recorded frame for
``fold: gather``), every weight is finite, and the pruned weights' checksums are as written. The
same checks run on a model in memory (:func:`verify_model`) before anything is saved."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..core.nm import NMPattern, nm_violations
from ..plugins.registry import adapter_named, find_adapter, get_adapter
from .checks import (
    non_finite_tensors,
    stored_tensor_names,
    weight_checksums,
)
from .models import load_checkpoint_model
from .sidecar import FORMAT, Sidecar


@dataclass
class Verification:
    """Result of :func:`verify_checkpoint`: one entry per check, ``ok`` only if all pass; a ``note``
    is a check that could not be made (it does not fail the verification, it is shown)."""

    checks: list[dict] = field(default_factory=list)

    def add(self, name: str, ok: bool, detail: str = "", note: bool = False) -> None:
        entry = {"check": name, "ok": bool(ok), "detail": detail}
        if note:
            entry["note"] = True
        self.checks.append(entry)

    @property
    def ok(self) -> bool:
        return all(c["ok"] for c in self.checks)

    def as_dict(self) -> dict:
        return {"ok": self.ok, "checks": self.checks}

    def render(self) -> str:
        def tag(c: dict) -> str:
            return "note" if c.get("note") else "ok  " if c["ok"] else "FAIL"

        lines = [f"{tag(c)}  {c['check']}  {c['detail']}" for c in self.checks]
        return "\n".join(lines + [f"verification {'passed' if self.ok else 'FAILED'}"])


def _linear_weight(model: nn.Module, name: str) -> torch.Tensor:
    return model.get_submodule(name).weight.detach()


def checkpoint_key_of(sidecar: Sidecar) -> Callable[[str], str] | None:
    """How the sidecar's architecture names a pruned linear's weight in the checkpoint (None: as
    ``{linear}.weight``, or an architecture no adapter registers)."""
    adapter = adapter_named(sidecar.architecture)
    return None if adapter is None else adapter.checkpoint_key


def linear_form(model: nn.Module) -> contextlib.AbstractContextManager:
    """``model``'s adapter's :meth:`~nmperm_plugin.arch.base.Adapter.linear_form` (every pruned weight
    an ``nn.Linear`` ``[out, in]``), or the model as it is when no adapter handles it."""
    adapter = find_adapter(model)
    return contextlib.nullcontext() if adapter is None else adapter.linear_form(model)


def adapter_linears(model: nn.Module, fold: str) -> set[str]:
    """Every linear the adapter of ``model`` permutes and would prune in fold mode ``fold`` (every part
    of a model pruned part by part); empty when no adapter handles it."""
    adapter = find_adapter(model)
    if adapter is None:
        return set()
    return {name for site in adapter.serving_sites(model, fold) for name in site.linears}


def record_claim(model: nn.Module, sidecar: Sidecar) -> Sidecar:
    """Record in ``sidecar`` which of the adapter's linears were left dense on purpose (every one not in
    its ``frames``; all of them without a mask), what :func:`verify_model` holds the model to."""
    everything = adapter_linears(model, sidecar.fold)
    sidecar.dense = sorted(everything - set(sidecar.frames)) if sidecar.masked else sorted(everything)
    return sidecar


def claim_failures(model: nn.Module, sidecar: Sidecar) -> list[str]:
    """How the sidecar's claim misses the model: a linear the adapter prunes that it lists neither as
    pruned (``frames``) nor as left dense (``dense``), one listed as both, or (masked) none pruned at all."""
    expected = adapter_linears(model, sidecar.fold)
    dense, pruned = set(sidecar.dense or ()), set(pruned_linears(sidecar))
    problems = []
    unlisted = sorted(expected - pruned - dense)
    if unlisted:
        shown = ", ".join(unlisted[:3]) + (f" and {len(unlisted) - 3} more" if len(unlisted) > 3 else "")
        problems.append(f"{len(unlisted)} linear(s) of the model listed neither as pruned nor as dense: {shown}")
    both = sorted(pruned & dense)
    if both:
        problems.append(f"listed as pruned and as dense: {', '.join(both[:3])}")
    if sidecar.masked and not pruned:
        problems.append("no linear is listed as pruned: this is not an N:M checkpoint")
    return problems


def pruned_linears(sidecar: Sidecar) -> list[str]:
    """Every linear the sidecar says is pruned: its frames and (format 2) its checksums."""
    return sorted(set(sidecar.frames) | set(sidecar.checksums))


def _nm_failures(model: nn.Module, sidecar: Sidecar, names: list[str], pattern: NMPattern) -> list[str]:
    """What is wrong with each of the pruned linears ``names`` (missing, no frame, not N:M in its frame)."""
    bad = []
    for name in names:
        try:
            weight = _linear_weight(model, name)
        except AttributeError:
            bad.append(f"{name}: missing from the model")
            continue
        if name not in sidecar.frames:
            bad.append(f"{name}: no frame in the sidecar")
            continue
        frame = sidecar.frame_of(name)
        if frame is not None:
            if len(frame) != weight.shape[1]:
                bad.append(f"{name}: permutation has {len(frame)} entries for {weight.shape[1]} inputs")
                continue
            weight = weight[:, frame]
        violations = nm_violations(weight, pattern) if weight.shape[1] % pattern.m == 0 else -1
        if violations:
            bad.append(f"{name}: {violations} groups break {pattern}" if violations > 0 else f"{name}: shape")
    return bad


def verify_model(model: nn.Module, sidecar: Sidecar, report: Verification | None = None) -> Verification:
    """Every pruned linear the sidecar lists is N:M (under its recorded permutation), the permutations
    are valid, the frames and checksums list the same linears, and every weight is finite."""
    report = report or Verification()
    pattern = NMPattern.parse(sidecar.pattern)
    for site, perm in sidecar.permutations.items():
        valid = sorted(perm) == list(range(len(perm)))
        report.add(f"permutation {site}", valid, f"{len(perm)} channels" if valid else "not a permutation")
    if sidecar.checksums:  # none yet in a sidecar not written (verify_checksums fails a written one without)
        only_frames = sorted(set(sidecar.frames) - set(sidecar.checksums))
        only_sums = sorted(set(sidecar.checksums) - set(sidecar.frames))
        detail = "; ".join(
            [f"no checksum for {', '.join(only_frames[:3])}"] * bool(only_frames)
            + [f"no frame for {', '.join(only_sums[:3])}"] * bool(only_sums)
        )
        report.add("frames and checksums list the same pruned linears", not detail, detail or f"{len(sidecar.frames)}")
    claim = claim_failures(model, sidecar)
    if not sidecar.masked:
        report.add("permutations only, no N:M mask", not claim, "; ".join(claim) or "not an N:M checkpoint", note=True)
    else:
        expected = len(adapter_linears(model, sidecar.fold))
        report.add(
            "every linear the model prunes is listed as pruned or as left dense",
            not claim,
            "; ".join(claim) or f"{expected} linears, {len(sidecar.dense or ())} left dense",
        )
    names = pruned_linears(sidecar)
    with linear_form(model):
        bad = _nm_failures(model, sidecar, names, pattern)
    report.add(f"{len(names)} pruned linears are {pattern}", not bad, "; ".join(bad[:5]))
    found = non_finite_tensors(model.named_parameters())
    shown = "; ".join(f"{n}: {b} of {t} NaN/inf" for n, b, t in found[:5])
    report.add("every weight is finite", not found, shown or f"{sum(1 for _ in model.parameters())} tensors")
    config = getattr(model, "config", None)
    sparsity = getattr(getattr(config, "quantization_config", None), "sparsity_config", None)
    declared = sparsity if isinstance(sparsity, dict) else getattr(sparsity, "__dict__", {})
    report.add(
        "no 2:4 sparsity_config (vLLM loads it as a dense model)",
        not declared or "2:4" not in str(declared.get("sparsity_structure", "")),
        str(declared.get("sparsity_structure", "none")) if declared else "none",
    )
    return report


def verify_checksums(directory: str | Path, sidecar: Sidecar, report: Verification) -> Verification:
    """Compare the sha256 of every pruned weight stored in ``directory`` with the sidecar's record."""
    if not sidecar.checksums:
        key_of = checkpoint_key_of(sidecar) or (lambda name: f"{name}.weight")
        stored = stored_tensor_names(directory)
        findable = [name for name in sidecar.frames if key_of(name) in stored]
        if sidecar.format != FORMAT:
            why = f"sidecar format {sidecar.format} records none"
            report.add("checksums of the pruned weights", True, f"not checked: {why}", note=True)
        elif findable:  # nmperm records one for every pruned weight it finds in the files: these were removed
            detail = f"none recorded for {len(findable)} pruned weights the safetensors files hold"
            report.add("checksums of the pruned weights", False, detail)
        elif sidecar.frames:
            why = "the safetensors files store the pruned weights under other names than the model's modules"
            report.add("checksums of the pruned weights", True, f"not checked: {why}", note=True)
        return report
    written = weight_checksums(directory, sidecar.checksums, checkpoint_key_of(sidecar))
    absent = [n for n in sidecar.checksums if n not in written]
    changed = [n for n, e in sidecar.checksums.items() if n in written and written[n]["sha256"] != e["sha256"]]
    parts = []
    if changed:
        parts.append(f"changed since written: {', '.join(changed[:5])}")
    if absent:
        parts.append(f"not in the safetensors files: {', '.join(absent[:5])}")
    report.add(f"checksums of {len(sidecar.checksums)} pruned weights match", not parts, "; ".join(parts) or "sha256")
    return report


def verify_checkpoint(directory: str | Path) -> Verification:
    """Load ``directory`` (:func:`load_checkpoint_model`) and check it against its sidecar:
    every pruned linear N:M, every weight finite, the pruned weights' checksums as written."""
    report = Verification()
    sidecar = Sidecar.load(directory)
    try:
        model = load_checkpoint_model(directory)
    except Exception as error:  # noqa: BLE001 - any load failure is the finding
        report.add("loads with from_pretrained", False, f"{type(error).__name__}: {error}")
        return report
    report.add("loads with from_pretrained", True, type(model).__name__)
    model_type = getattr(model.config, "model_type", "?")
    try:
        adapter = get_adapter(model)
        report.add("architecture matches the sidecar", adapter.name == sidecar.architecture, model_type)
    except ValueError as error:
        report.add("architecture matches the sidecar", False, str(error))
    verify_model(model, sidecar, report)
    return verify_checksums(directory, sidecar, report)
