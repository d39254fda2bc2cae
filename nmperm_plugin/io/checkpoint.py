"""Writing checkpoints: all or nothing, never over an existing one without consent, verified as
``nmperm verify`` does (:mod:`.verify`) before they are swapped in."""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path

from loguru import logger
from torch import nn

from . import safety
from .checks import (
    weight_checksums,
)
from .ownership import written_files
from .sidecar import Sidecar
from .verify import checkpoint_key_of, record_claim, verify_checkpoint

Inputs = Iterable[tuple[str, "str | Path | None"]]


class CheckpointError(RuntimeError):
    """The checkpoint just written fails ``nmperm verify``'s checks: it is not put in place."""


def check_output_dir(directory: str | Path, overwrite: bool, inputs: Inputs = ()) -> Path:
    """Everything about the output that can be checked before long work (:func:`safety.check_output`):
    not a protected path or an input (``inputs``: ``(label, path)``), replaceable only if nmperm wrote
    it, creatable. Returns the absolute path."""
    return safety.check_output(directory, overwrite, inputs, note=logger.warning)


def save_checkpoint(
    model: nn.Module,
    tokenizer,
    directory: str | Path,
    sidecar: Sidecar,
    overwrite: bool,
    inputs: Inputs = (),
    verify: bool = True,
) -> Path:
    """Save model, tokenizer and sidecar (with checksums of every pruned weight) to a staging sibling
    of ``directory``, verify it as ``nmperm verify`` does, then swap it in atomically
    (:func:`safety.atomic_write`): a failure or a kill leaves the old output (or none) in place."""

    record_claim(model, sidecar)

    seconds = {}

    def write(staging: Path) -> None:
        start = time.monotonic()
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        seconds["save"] = time.monotonic() - start
        finish_sidecar(staging, sidecar, verify)
        seconds["verify"] = time.monotonic() - start - seconds["save"]

    target = safety.atomic_write(directory, write, overwrite, inputs, note=logger.warning)
    logger.info(
        f"wrote {target} (saved in {seconds['save']:.1f} s, checksums and verification in {seconds['verify']:.1f} s)"
    )
    return target


def finish_sidecar(directory: Path, sidecar: Sidecar, verify: bool = True) -> Sidecar:
    """Record the checksums of the pruned weights written in ``directory`` in ``sidecar``, save it, and
    (``verify``) check the directory as ``nmperm verify`` does; :class:`CheckpointError` if it fails."""
    sidecar.checksums = weight_checksums(directory, sidecar.frames, checkpoint_key_of(sidecar))
    sidecar.files = written_files(directory)  # what --overwrite may replace later
    sidecar.save(directory)
    if verify:
        report = verify_checkpoint(directory)
        if not report.ok:
            failed = "; ".join(f"{c['check']}: {c['detail']}" for c in report.checks if not c["ok"])
            raise CheckpointError(f"the written checkpoint fails verification, not saving it: {failed}")
        sidecar.verification["checks"] = report.checks
        sidecar.save(directory)
    return sidecar
