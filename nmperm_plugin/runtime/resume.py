"""Resumable learning: a run that is interrupted (Ctrl-C, ``kill -9``, a crash) continues where it
stopped and ends with the permutations an uninterrupted run would have found.

A run's *phases* are its calls of :func:`~nmperm_plugin.learn.learner.learn`, in order, each with the label
the strategy gives it (``model``, ``layers 0-3``, ``layer 5``, ...). The :class:`ResumeStore` made
active with :func:`using` (a context variable that ``learn`` consults, so the strategies know nothing
of it) keeps in its own directory (for ``nmperm prune``: ``<output>.nmperm-state/``, next to the
output):

- ``nmperm-state.json``: the format and the run's :func:`fingerprint` (configuration, model,
  calibration data, device type);
- ``phase-NNNN.pt`` per finished phase: its label, best permutations, learning curve and the random
  generators' states at its end;
- ``current.pt`` for the phase in progress, every ``every_steps`` steps (or ``every_seconds``): the
  permuters' ``state_dict``, the Adam state, the step, the best permutations so far and their
  score, the learning curve and the generators' states (the objective's generator is the run's
  ``rng``, so restoring it makes the rest of the run draw what it would have drawn).

Every file is written to a temporary name, flushed and renamed over the old one (atomic). A rerun
with the same fingerprint skips the finished phases (their permutations and generator states are
restored) and continues the phase in progress from its last saved step; a different fingerprint is
refused with what differs. Only rank 0 reads and writes; the other ranks get what it read.

The files themselves (names, format, reading without pickle, the fingerprint) are in :mod:`.state`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path

import torch
from loguru import logger
from torch import nn

from . import distributed
from .state import (
    CURRENT,
    FORMAT,
    MARKER,
    SUFFIX,
    ResumeMismatchError,
    ResumeStateError,
    _write_atomic,
    check_state_dir,
    differences,
    fingerprint,
    is_state_dir,
    read_state_file,
    state_dir_of,
)

# what callers reach as resume.NAME, though it lives in .state
__all__ = [
    "SUFFIX",
    "Phase",
    "ResumeMismatchError",
    "ResumeStateError",
    "ResumeStore",
    "active",
    "check_state_dir",
    "fingerprint",
    "generator_states",
    "is_state_dir",
    "restore_generators",
    "resumable",
    "state_dir_of",
    "using",
]

_ACTIVE: ContextVar[ResumeStore | None] = ContextVar("nmperm_resume_store", default=None)


class ResumeStore:
    """The saved state of one run in ``directory`` (created at the first save, by rank 0).

    Make it active with :func:`using`; :meth:`open` first, on every rank, to check (and, with
    ``resume=False``, discard) a state left by an interrupted run.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        fingerprint: dict,
        every_steps: int = 5,
        every_seconds: float = 300.0,
        restart_hint: str = "pass resume=False",
    ) -> None:
        if every_steps < 1:
            raise ValueError(f"every_steps must be at least 1, got {every_steps}")
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        self.every_steps, self.every_seconds = every_steps, every_seconds
        self.restart_hint = restart_hint
        self.phases = 0  # learn() calls seen so far in this run
        self.resumed = False
        self._current: int | None = None  # rank 0: the phase current.pt belongs to

    # -- opening and removing (rank 0 works, every rank gets the outcome) -------------------------
    def open(self, resume: bool = True) -> ResumeStore:
        """Check the state directory: resume a state of the same run (``resumed``), refuse one of a
        different run (:class:`ResumeMismatchError`, saying what differs), discard it with ``resume=False``."""
        self.resumed = distributed.on_main(lambda: self._open(resume))
        return self

    def _open(self, resume: bool) -> bool:
        if not os.path.lexists(self.directory):
            return False
        check_state_dir(self.directory)
        if not resume:
            logger.warning(f"nmperm: discarding the learning state of an interrupted run in {self.directory}")
            self._remove()
            return False
        saved = json.loads((self.directory / MARKER).read_text()).get("fingerprint", {})
        changed = differences(saved, self.fingerprint)
        if changed:
            raise ResumeMismatchError(
                f"{self.directory} holds the learning state of an interrupted run with a different setup: "
                f"{'; '.join(changed)}. Rerun that run's command to resume it, or {self.restart_hint} to discard "
                "the state and start over"
            )
        finished = len(list(self.directory.glob("phase-*.pt")))
        current = self.directory / CURRENT
        where = ""
        if current.exists():
            snapshot = read_state_file(current, self.restart_hint)
            self._current = snapshot["ordinal"]
            where = f", {snapshot['description']!r} from step {snapshot['step']}"
        if saved.get("ranks") != self.fingerprint.get("ranks"):
            ranks = (saved.get("ranks"), self.fingerprint.get("ranks"))
            logger.warning(
                f"nmperm: the interrupted run had {ranks[0]} rank(s), this one {ranks[1]}: it continues correctly, "
                "equal to an uninterrupted run up to rounding"
            )
        logger.info(
            f"nmperm: resuming the interrupted learning in {self.directory} ({finished} finished phase(s){where})"
        )
        return True

    def remove(self) -> None:
        """Delete the state directory, on rank 0 (no collective: call it once the final output is
        written and verified, e.g. inside :func:`~nmperm_plugin.runtime.distributed.on_main`)."""
        if distributed.is_main():
            self._remove()

    def _remove(self) -> None:
        if not os.path.lexists(self.directory):
            return
        if not self.directory.name.endswith(SUFFIX) or not is_state_dir(self.directory):
            raise RuntimeError(f"bug: refusing to delete {self.directory}, which is not an nmperm learning state")
        shutil.rmtree(self.directory)

    # -- phases -----------------------------------------------------------------------------------
    def begin(self, description: str) -> Phase:
        """The next phase of the run (``learn`` calls this once per call, in the same order on every rank)."""
        phase = Phase(self, self.phases, description)
        self.phases += 1
        return phase

    def _path(self, ordinal: int) -> Path:
        return self.directory / f"phase-{ordinal:04d}.pt"

    def _ensure(self) -> None:
        if self.directory.is_dir() and is_state_dir(self.directory):
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        marker = {"format": FORMAT, "fingerprint": self.fingerprint, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        _write_atomic(self.directory / MARKER, lambda path: path.write_text(json.dumps(marker, indent=1)))

    def _save(self, name: str, payload: dict) -> None:
        if not distributed.is_main():
            return
        try:
            self._ensure()
            _write_atomic(self.directory / name, lambda path: torch.save(payload, path))
        except Exception as error:
            from ..io.replace import disk_full_error, is_disk_full

            if is_disk_full(error):
                for leftover in self.directory.glob(f".{name}.tmp-*"):
                    leftover.unlink(missing_ok=True)
                raise disk_full_error(error, self.directory, "the learning state") from error
            raise

    def _load(self, path: Path, ordinal: int, description: str) -> dict | None:
        def read() -> dict | None:
            if not self.resumed or not path.exists() or (path.name == CURRENT and self._current != ordinal):
                return None
            payload = read_state_file(path, self.restart_hint)
            if payload.get("ordinal") != ordinal:
                return None
            if payload.get("description") != description:
                raise ResumeMismatchError(
                    f"{path}: phase {ordinal} of the interrupted run was {payload.get('description')!r}, this run's "
                    f"is {description!r} (its setup differs); {self.restart_hint} to discard the state"
                )
            return payload

        return distributed.on_main(read)


class Phase:
    """One ``learn`` call's view of the store: its saved result or progress, and its saves."""

    def __init__(self, store: ResumeStore, ordinal: int, description: str) -> None:
        self.store, self.ordinal, self.description = store, ordinal, description
        self.last_step, self.last_time = 0, time.monotonic()

    def finished(self) -> dict | None:
        """The saved result of this phase (``perms``, ``history``, ``generators``) if it finished before."""
        return self.store._load(self.store._path(self.ordinal), self.ordinal, self.description)

    def progress(self) -> dict | None:
        """The last saved state of this phase in progress, if the interrupted run was in it."""
        snapshot = self.store._load(self.store.directory / CURRENT, self.ordinal, self.description)
        if snapshot is not None:
            self.last_step = snapshot["step"]
        return snapshot

    def due(self, step: int) -> bool:
        """Whether to save after ``step`` steps (every ``every_steps`` steps or ``every_seconds``)."""
        store = self.store
        return step - self.last_step >= store.every_steps or time.monotonic() - self.last_time >= store.every_seconds

    def save_progress(self, payload: dict) -> None:
        self.store._save(CURRENT, {"ordinal": self.ordinal, "description": self.description} | payload)
        self.last_step, self.last_time = payload["step"], time.monotonic()

    def finish(self, payload: dict) -> None:
        self.store._save(
            self.store._path(self.ordinal).name, {"ordinal": self.ordinal, "description": self.description} | payload
        )


def active() -> ResumeStore | None:
    """The store ``learn`` saves to and resumes from (None: learning is not resumable)."""
    return _ACTIVE.get()


@contextlib.contextmanager
def using(store: ResumeStore | None) -> Iterator[ResumeStore | None]:
    """Make ``store`` the active one inside the block (``None``: none)."""
    token = _ACTIVE.set(store)
    try:
        yield store
    finally:
        _ACTIVE.reset(token)


def generator_states(generator: torch.Generator | None) -> dict:
    """The random states a learning phase consumes: its objective's generator and torch's global one."""
    states = {"torch": torch.get_rng_state()}
    if generator is not None:
        states["objective"] = generator.get_state()
    return states


def restore_generators(generator: torch.Generator | None, states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if generator is not None and "objective" in states:
        generator.set_state(states["objective"])


@contextlib.contextmanager
def resumable(
    directory: str | os.PathLike,
    model: nn.Module,
    calibration: torch.Tensor,
    config,
    resume: bool = True,
    every_steps: int = 5,
    device: torch.device | None = None,
) -> Iterator[ResumeStore]:
    """Make the learning inside the block resumable from ``directory`` (Python API)::

        with resumable("out.nmperm-state", model, calibration, config) as state:
            sidecar, result = permute_(model, calibration, config)
            save_checkpoint(model, tokenizer, "out", sidecar, overwrite=False)
            state.remove()  # only once the output is safely written

    Call it before ``model`` changes (the fingerprint reads its weights). ``device``: where the run
    computes, if not where the weights are (``permute_``'s ``device``).
    """
    device = next(model.parameters()).device if device is None else device
    store = ResumeStore(directory, fingerprint(model, calibration, config, device), every_steps).open(resume)
    with using(store):
        yield store
