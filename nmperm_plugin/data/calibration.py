"""Calibration data as the pipeline sees it: one dict of model inputs per sample.

``permute_`` takes either a ``[num_sequences, seq_len]`` tensor of token ids or an iterable of
batches, each a mapping of model inputs as a processor returns them (``input_ids``,
``pixel_values``, ``attention_mask``, ``labels``, ...), every tensor with the batch on its first
dimension. :func:`samples_of` turns both into a list of single-sample dicts (batch dimension 1), the
unit the layer walk captures and the objectives draw from. Which keys are model inputs and which
are labels is the adapter's decision (:meth:`nmperm_plugin.arch.base.Adapter.model_inputs`,
:meth:`~nmperm_plugin.arch.base.Adapter.labels`); nothing here knows a model family.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

Sample = dict[str, torch.Tensor]
CalibrationData = torch.Tensor | Iterable[Mapping[str, object]]


def _token_samples(input_ids: torch.Tensor) -> list[Sample]:
    if input_ids.ndim != 2 or input_ids.numel() == 0:
        raise ValueError("calibration input_ids must be a non-empty [num_sequences, seq_len] tensor")
    return [{"input_ids": row[None]} for row in input_ids]


def split_batch(batch: Mapping[str, object]) -> list[Sample]:
    """One dict per sample of ``batch`` (values: tensors or anything ``torch.as_tensor`` takes, all
    with the same first dimension; ``None`` values are dropped)."""
    tensors = {k: torch.as_tensor(v) for k, v in batch.items() if v is not None}
    sizes = {k: (t.shape[0] if t.ndim else None) for k, t in tensors.items()}
    if not tensors or None in sizes.values() or len(set(sizes.values())) != 1:
        raise ValueError(
            f"a calibration batch needs tensors with one batch size on their first dimension, got shapes "
            f"{ {k: tuple(t.shape) for k, t in tensors.items()} }"
        )
    return [{k: t[i : i + 1] for k, t in tensors.items()} for i in range(next(iter(sizes.values())))]


def samples_of(data: CalibrationData) -> list[Sample]:
    """Single-sample model-input dicts from token ids ``[N, T]`` or from batches of model inputs."""
    if isinstance(data, torch.Tensor):
        return _token_samples(data)
    if isinstance(data, Mapping):
        raise TypeError("calibration batches must be an iterable of dicts (a list, a DataLoader), not one dict")
    samples = [sample for batch in data for sample in split_batch(batch)]
    if not samples:
        raise ValueError("the calibration data holds no sample")
    return samples


def stack_labels(labels: list[torch.Tensor | None]) -> torch.Tensor | None:
    """The samples' labels on one tensor (``[N, ...]``), or None when no sample has any."""
    missing = sum(label is None for label in labels)
    if missing == len(labels):
        return None
    if missing:
        raise ValueError(f"{missing} of {len(labels)} calibration samples have no labels; give all or none")
    return torch.cat(labels)


def calibration_tensors(data: torch.Tensor | list[Mapping[str, torch.Tensor]]) -> list[torch.Tensor]:
    """Every tensor of the calibration data in order (what a fingerprint of it digests): the token
    ids themselves, or each batch's tensors by key."""
    if isinstance(data, torch.Tensor):
        return [data]
    return [torch.as_tensor(batch[key]) for batch in data for key in sorted(batch) if batch[key] is not None]


def to_device(sample: Mapping[str, object], device: torch.device) -> dict:
    """``sample`` with its tensors on ``device`` (other values, e.g. ``use_cache``, unchanged)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in sample.items()}
