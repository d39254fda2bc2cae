"""The learning state on disk (:mod:`.resume` uses it): the directory's name and marker, the run's
fingerprint (configuration, model, calibration data, device type) and what differs from a saved
one, atomic writes, and reading a state file with ``torch.load(weights_only=True)`` and checked keys
(nothing read can run code; a damaged file is named with the way out)."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
from pathlib import Path

import torch
from torch import nn

from ..data.calibration import CalibrationData, calibration_tensors
from . import distributed

FORMAT = "nmperm-state/1"


MARKER = "nmperm-state.json"


SUFFIX = ".nmperm-state"


CURRENT = "current.pt"


class ResumeMismatchError(ValueError):
    """The saved state belongs to a run with another configuration, model or calibration data."""


class ResumeStateError(ValueError):
    """A file of the saved state is truncated, damaged or not what nmperm writes there."""


# what each saved file must hold (``ordinal`` and ``description`` besides)


# what each saved file must hold (``ordinal`` and ``description`` besides)
_KEYS = {
    "current": ("step", "permuters", "optimizer", "best", "best_perms", "history", "generators"),
    "phase": ("perms", "history", "generators"),
}


def read_state_file(path: Path, restart_hint: str = "pass resume=False") -> dict:
    """The payload of a saved state file, read with ``torch.load(weights_only=True)``: tensors and plain
    containers only, so a file planted in the state directory can never run code. A truncated, damaged
    or foreign file is a :class:`ResumeStateError` naming it and saying how to start over."""
    kind = "current" if path.name == CURRENT else "phase"
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ResumeStateError(
            f"{path} holds Python objects other than tensors, numbers and plain containers, which nmperm never "
            f"loads (they could run code): it was not written by nmperm; {restart_hint} to discard the state and "
            "start over"
        ) from None
    except Exception as error:  # noqa: BLE001 - truncated zip, an I/O error: all say the same
        reason = " ".join(str(error).split())[:200] or type(error).__name__
        raise ResumeStateError(
            f"{path} is truncated, damaged or not an nmperm learning state ({type(error).__name__}: {reason}); "
            f"{restart_hint} to discard the state and start over"
        ) from None
    missing = (
        []
        if not isinstance(payload, dict)
        else [k for k in ("ordinal", "description", *_KEYS[kind]) if k not in payload]
    )
    if not isinstance(payload, dict) or missing or not isinstance(payload["ordinal"], int):
        what = f"lacks {', '.join(missing)}" if missing else "is not a saved learning phase"
        raise ResumeStateError(
            f"{path} {what}: it is damaged or was not written by nmperm; {restart_hint} to discard the state and "
            "start over"
        )
    return payload


def state_dir_of(output: str | os.PathLike) -> Path:
    """The state directory of an output directory: its sibling ``<output>.nmperm-state``."""
    target = Path(os.path.realpath(os.path.abspath(os.fspath(output))))
    return target.with_name(target.name + SUFFIX)


def model_summary(model: nn.Module) -> str:
    """A digest of every parameter's name, shape, dtype, float64 sum and L2 norm: any real change of a
    weight changes it, without hashing every byte of a 70B model."""
    rows = []
    for name, parameter in model.named_parameters():
        if parameter.device.type == "meta":
            rows.append(f"{name}:{tuple(parameter.shape)}:{parameter.dtype}:meta")
            continue
        data = parameter.detach()
        total = float(torch.sum(data, dtype=torch.float64))
        norm = float(torch.linalg.vector_norm(data, dtype=torch.float64))
        rows.append(f"{name}:{tuple(parameter.shape)}:{parameter.dtype}:{total!r}:{norm!r}")
    return distributed.digest([torch.frombuffer(bytearray("\n".join(rows).encode()), dtype=torch.uint8)])


def fingerprint(model: nn.Module, calibration: CalibrationData, config, device: torch.device | str = "cpu") -> dict:
    """What a saved state must match to be resumed: every configuration field, the model's weights
    (:func:`model_summary`), the calibration token ids (or image batches) and the device type (the
    learning precision depends on it). The number of ranks is recorded, not compared (a resume with another count
    continues correctly, equal to rounding); an unset ``sequences_per_step`` is compared as the ranks
    resolve it, since it follows their count."""
    fields = json.loads(json.dumps(dataclasses.asdict(config)))
    fields["sequences_per_step"] = distributed.sequences_per_step(config.sequences_per_step, log=False)
    return {
        "config": fields,
        "model": model_summary(model),
        "calibration": distributed.digest(calibration_tensors(calibration)),
        "device": torch.device(device).type,
        "ranks": distributed.world_size(),
    }


def differences(saved: dict, now: dict) -> list[str]:
    """What differs between two fingerprints, in words (empty: the same run)."""
    found = []
    saved_config, config = saved.get("config", {}), now.get("config", {})
    for name in sorted(set(saved_config) | set(config)):
        if saved_config.get(name, "(unset)") != config.get(name, "(unset)"):
            found.append(f"{name} {saved_config.get(name, '(unset)')!r} there, {config.get(name, '(unset)')!r} now")
    if saved.get("model") != now.get("model"):
        found.append("the model's weights")
    if saved.get("calibration") != now.get("calibration"):
        found.append("the calibration data (dataset, --num-samples, --seq-len or --seed)")
    if saved.get("device") != now.get("device"):
        found.append(f"the device ({saved.get('device')} there, {now.get('device')} now)")
    return found


def _write_atomic(path: Path, write) -> None:
    """``write(temporary path)``, flushed to disk, then renamed over ``path`` (and the rename flushed)."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(temporary)
    with open(temporary, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def is_state_dir(directory: Path) -> bool:
    """Whether ``directory`` is a state directory this module wrote (its marker names the format)."""
    try:
        data = json.loads((directory / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT


def check_state_dir(directory: Path) -> None:
    """Refuse (``FileExistsError``) a ``directory`` that exists and is not a state nmperm wrote: it is
    never used nor deleted. Checked before the model loads."""
    if os.path.lexists(directory) and (not Path(directory).is_dir() or not is_state_dir(Path(directory))):
        raise FileExistsError(
            f"{directory} exists and is not an nmperm learning state (no {MARKER} of format {FORMAT}); "
            "nmperm keeps its resumable state there: move that away, or choose another output"
        )
