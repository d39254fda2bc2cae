"""Writing and verifying checkpoints: all or nothing, never over an existing one without consent."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from loguru import logger
from torch import nn

from .nm import NMPattern, nm_violations
from .sidecar import Sidecar


def check_output_dir(directory: str | Path, overwrite: bool) -> Path:
    """Refuse a non-empty output directory unless ``overwrite``; call before any long work."""
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"output {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"output directory {path} is not empty: pass --overwrite to replace it, or pick another")
    return path


def save_checkpoint(model: nn.Module, tokenizer, directory: str | Path, sidecar: Sidecar, overwrite: bool) -> Path:
    """Save model, tokenizer and sidecar to ``directory`` through a temporary sibling, then swap it in,
    so a failure leaves no half-written directory and the old one is replaced only at the end."""
    target = check_output_dir(directory, overwrite).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        sidecar.save(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info(f"wrote {target}")
    return target


@dataclass
class Verification:
    """Result of :func:`verify_checkpoint`: one entry per check, ``ok`` only if all pass."""

    checks: list[dict] = field(default_factory=list)

    def add(self, name: str, ok: bool, detail: str = "") -> None:
        self.checks.append({"check": name, "ok": bool(ok), "detail": detail})

    @property
    def ok(self) -> bool:
        return all(c["ok"] for c in self.checks)

    def as_dict(self) -> dict:
        return {"ok": self.ok, "checks": self.checks}

    def render(self) -> str:
        lines = [f"{'ok ' if c['ok'] else 'FAIL'}  {c['check']}  {c['detail']}" for c in self.checks]
        return "\n".join(lines + [f"verification {'passed' if self.ok else 'FAILED'}"])


def _linear_weight(model: nn.Module, name: str) -> torch.Tensor:
    return model.get_submodule(name).weight.detach()


def verify_model(model: nn.Module, sidecar: Sidecar, report: Verification | None = None) -> Verification:
    """Every linear the sidecar lists is N:M (under its recorded permutation) and the permutations are valid."""
    report = report or Verification()
    pattern = NMPattern.parse(sidecar.pattern)
    for site, perm in sidecar.permutations.items():
        valid = sorted(perm) == list(range(len(perm)))
        report.add(f"permutation {site}", valid, f"{len(perm)} channels" if valid else "not a permutation")
    bad = []
    for name in sidecar.frames:
        try:
            weight = _linear_weight(model, name)
        except AttributeError:
            bad.append(f"{name}: missing from the model")
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
    report.add(f"{len(sidecar.frames)} pruned linears are {pattern}", not bad, "; ".join(bad[:5]))
    config = getattr(model, "config", None)
    sparsity = getattr(getattr(config, "quantization_config", None), "sparsity_config", None)
    declared = sparsity if isinstance(sparsity, dict) else getattr(sparsity, "__dict__", {})
    report.add(
        "no 2:4 sparsity_config (vLLM loads it as a dense model)",
        not declared or "2:4" not in str(declared.get("sparsity_structure", "")),
        str(declared.get("sparsity_structure", "none")) if declared else "none",
    )
    return report


def verify_checkpoint(directory: str | Path) -> Verification:
    """Load ``directory`` with ``AutoModelForCausalLM.from_pretrained`` and check it against its sidecar."""
    from transformers import AutoModelForCausalLM

    report = Verification()
    sidecar = Sidecar.load(directory)
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype="float32")
    except Exception as error:  # noqa: BLE001 - any load failure is the finding
        report.add("loads with AutoModelForCausalLM.from_pretrained", False, f"{type(error).__name__}: {error}")
        return report
    report.add("loads with AutoModelForCausalLM.from_pretrained", True, type(model).__name__)
    model_type = getattr(model.config, "model_type", "?")
    from .arch import get_adapter

    try:
        adapter = get_adapter(model)
        report.add("architecture matches the sidecar", adapter.name == sidecar.architecture, model_type)
    except ValueError as error:
        report.add("architecture matches the sidecar", False, str(error))
    return verify_model(model, sidecar, report)
