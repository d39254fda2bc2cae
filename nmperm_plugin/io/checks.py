"""Checks of the numbers nmperm reads and writes: non-finite weights and activations, model and
weight files (safetensors headers, truncation), checksums of written weights, shapes a pattern needs.

Every check raises ``ValueError`` with a message that names the tensor, layer or file and says what
to do, so the command line can print it as one line.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from ..core.nm import NMPattern
from ..core.scores import NonFiniteError, check_finite_stats

__all__ = ["NonFiniteError", "check_finite_stats"]  # re-exported: the checks live in one place

SAFETENSORS_INDEX = "model.safetensors.index.json"
_HEADER_LIMIT = 100_000_000  # safetensors' own limit on the JSON header


class WeightFileError(ValueError):
    """A weight file is missing, truncated or not a safetensors file."""


# -- non-finite numbers ------------------------------------------------------------------------------
def non_finite_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, int, int]]:
    """``(name, non-finite count, numel)`` of every floating tensor with NaN or inf values."""
    found = []
    for name, tensor in named:
        if not tensor.is_floating_point() or tensor.numel() == 0:
            continue
        values = tensor.detach()
        if values.element_size() == 1:  # float8 (e.g. an FP8 checkpoint): isfinite is not implemented for it
            values = values.to(torch.float16)
        bad = int((~torch.isfinite(values)).sum())
        if bad:
            found.append((name, bad, tensor.numel()))
    return found


def _describe(found: list[tuple[str, int, int]]) -> str:
    shown = ", ".join(f"{name} ({bad} of {numel})" for name, bad, numel in found[:3])
    return shown + (f" and {len(found) - 3} more tensors" if len(found) > 3 else "")


def check_finite_parameters(model: nn.Module, source: str = "the model") -> None:
    """Raise :class:`NonFiniteError` naming every parameter of ``model`` that holds NaN or inf."""
    found = non_finite_tensors(model.named_parameters())
    if found:
        raise NonFiniteError(
            f"{source} has NaN or infinite weights in {_describe(found)}: the checkpoint is corrupt (or was saved "
            "from a diverged run), so nothing can be pruned or measured on it; use an intact copy of the model"
        )


# -- shapes a pattern needs --------------------------------------------------------------------------
def check_pattern_fits(pattern: NMPattern, linears: Mapping[str, nn.Module], sites: Iterable = ()) -> None:
    """Every linear's input splits into groups of M and, for each of ``sites`` whose permutation is
    tied per head (exact fold ``attn_out``), every head does too. Pass the sites only when they are
    permuted (any method but identity)."""
    for name, linear in linears.items():
        channels = linear.weight.shape[1]
        if channels % pattern.m:
            raise ValueError(
                f"{name} has {channels} input channels, not divisible by M={pattern.m} of pattern {pattern}: "
                f"choose a --pattern whose M divides {channels} (e.g. 2:4)"
            )
    for site in sites:
        size = getattr(site, "head_size", None)
        if getattr(site, "tied_heads", None) is not None and size is not None and size % pattern.m:
            raise ValueError(
                f"pattern {pattern} needs groups of {pattern.m} channels inside each attention head, but {site.name} "
                f"has heads of {size} channels (the exact fold permutes o_proj inputs within a head): choose a "
                f"--pattern whose M divides {size}, or --fold gather"
            )


# -- weight files ------------------------------------------------------------------------------------
def available_memory(device: torch.device) -> int:
    """Bytes free on ``device``: CUDA's free memory, or the host's available RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil  # a dependency of llm-compressor and accelerate

    return psutil.virtual_memory().available


def dense_targets_shortfall(hidden: torch.Tensor, layers: int, device: torch.device) -> str | None:
    """Why every layer's dense output of the calibration sequences (``hidden``: ``[N, T, D]``) does
    not fit in 80% of what ``device`` has free, or None when it fits."""
    needed = hidden.numel() * hidden.element_size() * layers
    free = available_memory(device)
    if needed <= 0.8 * free:
        return None
    return (
        f"the dense targets of {len(hidden)} calibration sequences x {layers} decoder layers need "
        f"{needed / 2**30:.1f} GiB on {device} and {free / 2**30:.1f} GiB are free"
    )


def check_fits_in_memory(hidden: torch.Tensor, layers: int, device: torch.device) -> None:
    """Refuse before the dense pass when the dense targets would not fit (:func:`dense_targets_shortfall`)."""
    shortfall = dense_targets_shortfall(hidden, layers, device)
    if shortfall is not None:
        raise MemoryError(
            f"{shortfall}: use fewer or shorter calibration sequences (--num-samples, --seq-len) or a layer-wise "
            f"objective"
        )


def safetensors_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the offset where its data starts.

    Raises :class:`WeightFileError` naming the file if it is not a safetensors file or is truncated.
    """
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise WeightFileError(f"{path} is truncated ({size} bytes): not a safetensors file; re-save the model")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(_HEADER_LIMIT, size - 8):
            raise WeightFileError(
                f"{path} is truncated or not a safetensors file (header of {length} bytes in a {size}-byte file); "
                "re-save or re-download the model"
            )
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            header = None
    if not isinstance(header, dict):
        raise WeightFileError(f"{path} has a damaged safetensors header; re-save or re-download the model")
    start = 8 + length
    end = max((e["data_offsets"][1] for k, e in header.items() if k != "__metadata__"), default=0)
    if start + end > size:
        raise WeightFileError(
            f"{path} is truncated: its header describes {start + end} bytes but the file has {size}; "
            "the copy or save was interrupted: re-save or re-download the model"
        )
    return header, start


def weight_files(directory: str | Path) -> list[Path]:
    """The model's weight files in ``directory`` (safetensors preferred, else ``pytorch_model*.bin``)."""
    directory = Path(directory)
    safetensors = sorted(directory.glob("*.safetensors"))
    return safetensors or sorted(directory.glob("pytorch_model*.bin"))


def check_weight_files(directory: str | Path) -> list[Path]:
    """Raise :class:`WeightFileError` if ``directory`` has no weights, a truncated safetensors file, or a
    shard index naming a missing file; returns the weight files."""
    directory = Path(directory)
    files = weight_files(directory)
    if not files:
        raise WeightFileError(
            f"{directory} holds no weights (no *.safetensors or pytorch_model*.bin): save the model there with "
            "model.save_pretrained, or point at the right directory"
        )
    index = directory / SAFETENSORS_INDEX
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError):
            raise WeightFileError(f"{index} is damaged (no valid weight_map); re-save the model") from None
        missing = sorted(s for s in shards if not (directory / s).is_file())
        if missing:
            raise WeightFileError(f"{index} names missing shard(s) {', '.join(missing)}; copy them or re-save")
    for path in files:
        if path.suffix == ".safetensors":
            safetensors_header(path)
    return files


def check_loading_info(info: Mapping, source: str | Path) -> None:
    """Refuse a model whose weights did not all load (``from_pretrained(..., output_loading_info=True)``):
    a tensor the model needs that the files lack would be initialised at random, one the files hold that
    the model has no place for would be dropped. :class:`WeightFileError` naming the tensors."""
    problems = []
    for key, what in (
        ("missing_keys", "missing from the weight files (it would be initialised at random)"),
        ("unexpected_keys", "in the weight files but not in the model (it would be dropped)"),
        ("mismatched_keys", "of another shape in the weight files"),
    ):
        names = sorted(str(n[0] if isinstance(n, tuple) else n) for n in info.get(key) or ())
        if names:
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            problems.append(f"{len(names)} tensor(s) {what}: {shown}")
    errors = [str(e) for e in info.get("error_msgs") or ()]
    if errors:
        problems.append("; ".join(errors[:3]))
    if problems:
        raise WeightFileError(
            f"model {source} does not load whole: {'; '.join(problems)}. The checkpoint is incomplete or damaged: "
            "re-save or re-download it"
        )


def stored_float_dtype(directory: str | Path) -> torch.dtype | None:
    """The floating dtype most of ``directory``'s safetensors weights are stored in (by elements), or
    None (no safetensors files)."""
    names = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
    counts: dict[torch.dtype, int] = {}
    for _, entry, _ in _tensor_locations(Path(directory)).values():
        dtype = names.get(entry.get("dtype"))
        if dtype is not None:
            numel = 1
            for size in entry.get("shape", []):
                numel *= size
            counts[dtype] = counts.get(dtype, 0) + numel
    return max(counts, key=counts.get) if counts else None


def _tensor_locations(directory: Path) -> dict[str, tuple[Path, dict, int]]:
    """``tensor name -> (file, header entry, data start)`` over every safetensors file of ``directory``."""
    where = {}
    for path in sorted(directory.glob("*.safetensors")):
        header, start = safetensors_header(path)
        for name, entry in header.items():
            if name != "__metadata__":
                where[name] = (path, entry, start)
    return where


def stored_tensor_names(directory: str | Path) -> set[str]:
    """The names of the tensors stored in ``directory``'s safetensors files (headers only)."""
    return set(_tensor_locations(Path(directory)))


def weight_checksums(
    directory: str | Path, linears: Iterable[str], key_of: Callable[[str], str] | None = None
) -> dict[str, dict]:
    """``linear -> {"sha256", "dtype", "shape"}`` of ``linear.weight``'s bytes as stored in the
    safetensors files of ``directory`` (linears whose weight is not stored there are left out).
    ``key_of``: the stored tensor's name for a linear (default ``{linear}.weight``; an adapter's
    ``checkpoint_key`` where the checkpoint names it otherwise, e.g. Mixtral's experts)."""
    where = _tensor_locations(Path(directory))
    checksums = {}
    for linear in linears:
        key = key_of(linear) if key_of is not None else f"{linear}.weight"
        if key not in where:
            continue
        path, entry, start = where[key]
        begin, end = entry["data_offsets"]
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            handle.seek(start + begin)
            remaining = end - begin
            while remaining:
                chunk = handle.read(min(remaining, 1 << 24))
                if not chunk:
                    raise WeightFileError(f"{path} is truncated inside {key}; re-save the model")
                digest.update(chunk)
                remaining -= len(chunk)
        checksums[linear] = {"sha256": digest.hexdigest(), "dtype": entry["dtype"], "shape": list(entry["shape"])}
    return checksums
