"""The Python entry point: ``permute_(model, calibration, PermuteConfig(...))``, torchao style."""

from __future__ import annotations

import torch
from torch import nn

from .calibration import CalibrationData, samples_of, to_device
from .config import PermuteConfig
from .fold import fold_
from .onload import execution_device
from .ops import function_error, function_tolerance
from .pipeline import PruneResult, permute_and_prune_
from .registry import get_adapter
from .sidecar import Sidecar


def permute_(
    model: nn.Module, calibration: CalibrationData, config: PermuteConfig, device: torch.device | str | None = None
) -> tuple[Sidecar, PruneResult]:
    """Permute (and, with ``config.apply_mask``, prune) ``model`` in place and fold the permutations.

    ``calibration`` is ``[num_sequences, seq_len]`` token ids, or an iterable of batches of model
    inputs as a processor returns them (dicts of tensors with the batch first: ``pixel_values``,
    ``input_ids``, ``labels``, ...; :mod:`nmperm_plugin.calibration`). With labels (and always for a
    causal LM, whose labels are its next tokens) the learned objectives use the model's own loss.
    ``device``: where to compute (None: where the model's weights are); a model kept on the CPU
    learns on a GPU with ``device="cuda"``, one decoder layer copied there at a time (layer
    checkpointing on), its weights staying where they are.
    Returns the sidecar to save beside the model (permutations, frames, figures) and the raw result
    (learning curves). Raises if folding changed the model's function beyond its precision's
    tolerance (relative to the outputs' scale).

    Example::

        from nmperm_plugin import PermuteConfig, permute_
        sidecar, result = permute_(model, input_ids, PermuteConfig(pattern="2:4", scorer="wanda"))
        sidecar, result = permute_(vit, [{"pixel_values": x, "labels": y}], PermuteConfig())
    """
    samples = samples_of(calibration)
    result = permute_and_prune_(model, samples, config, execution_device(device))
    adapter = get_adapter(model)
    probe = to_device(adapter.model_inputs(samples[0]), next(model.parameters()).device)
    with torch.no_grad():
        before = adapter.outputs(model(**probe))
    frames = fold_(model, result, config.fold)
    with torch.no_grad():
        fold_error = function_error(before, adapter.outputs(model(**probe)))
    if fold_error > function_tolerance(before.dtype):
        raise RuntimeError(
            f"folding changed the model's outputs by {fold_error:.3g} of their scale: this is a bug, please report it"
        )
    sidecar = Sidecar(
        pattern=config.pattern,
        scorer=config.scorer,
        method=config.method if config.method != "learned" else f"learned/{result.objective}",
        fold=config.fold,
        architecture=adapter.name,
        permutations={name: perm.tolist() for name, perm in result.perms.items()},
        frames=frames if config.apply_mask else {},
        masked=config.apply_mask,
        figures={
            "permutation_seconds": round(result.seconds, 1),
            "retained_ratio": sum(result.retained.values()) / max(len(result.retained), 1),
            "retained_ratio_per_layer": result.retained,
        },
        verification={"fold_relative_logit_error": fold_error},
    )
    sidecar.dense = dense_linears(model, sidecar)
    return sidecar, result


def dense_linears(model: nn.Module, sidecar: Sidecar) -> list[str]:
    """The linears ``model``'s adapter permutes that ``sidecar`` does not list as pruned (all of them
    without a mask): what it records as left dense on purpose, and ``nmperm verify`` holds it to."""
    adapter = get_adapter(model)
    linears = {name for site in adapter.serving_sites(model, sidecar.fold) for name in site.linears}
    return sorted(linears - set(sidecar.frames)) if sidecar.masked else sorted(linears)
