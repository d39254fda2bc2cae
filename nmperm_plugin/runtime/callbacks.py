"""What the learner (:func:`nmperm_plugin.learn.learner.learn`) calls at fixed points of a learning
run, so that resuming (:mod:`.resume`) and several ranks (:mod:`.distributed`) plug into it without
branches in the learning loop: :class:`LearnCallback` and the two runtime services' callbacks.

A callback sees the run's state (``state``: the effective weights, the optimizer, the random
generator the objective draws from, the step reached, the best hard permutations and their
ranking, the learning curve) and may change it; every method does nothing by default.
"""

from __future__ import annotations

from loguru import logger

from . import distributed, resume


class LearnCallback:
    """No-op hooks of a learning run; subclasses override what they need."""

    quiet: bool = False  # no progress bar on this process

    def finished(self, state) -> tuple[dict, list[dict]] | None:
        """A result (hard permutations on the CPU, learning curve) that makes learning unnecessary."""
        return None

    def begin(self, state) -> bool:
        """Before the first step: restore a saved point into ``state``; True if it did."""
        return False

    def after_backward(self, state) -> None:
        """The gradients of ``state.effective.permuters`` are computed, not yet applied."""

    def loss_value(self, value: float) -> float:
        """The loss recorded in the learning curve, from this process's ``value``."""
        return value

    def after_step(self, state) -> None:
        """``state.step`` steps are done and recorded."""

    def end(self, state) -> None:
        """The last step is done; ``state.best_perms`` is the result."""


class DistributedCallback(LearnCallback):
    """A learning run across ranks: every rank starts from the same permuters (checked), the ranks'
    gradients are summed before each step (each rank's loss is pre-scaled by its share), the loss
    recorded is the sum over the ranks, and only rank 0 shows progress."""

    def __init__(self, description: str) -> None:
        self.description = description
        self.quiet = not distributed.is_main()

    def begin(self, state) -> bool:
        effective = state.effective
        tensors = [t for _, t in sorted(effective.permuters.state_dict().items())] + list(effective.fixed.values())
        distributed.check_same(f"the starting permutations of {self.description!r}", distributed.digest(tensors))
        return False

    def after_backward(self, state) -> None:
        distributed.sum_gradients(state.effective.permuters.parameters())

    def loss_value(self, value: float) -> float:
        return distributed.sum_float(value)


def distributed_callback(description: str) -> DistributedCallback | None:
    """The callback of a learning run under ``torch.distributed`` with several ranks (else None)."""
    return DistributedCallback(description) if distributed.world_size() > 1 else None


class ResumeCallback(LearnCallback):
    """One learning run as a phase of the active store: a phase the interrupted run finished returns
    its saved result (and restores the random states it left), a phase it was in continues from its
    last saved step, and progress is saved as it goes."""

    def __init__(self, phase: resume.Phase) -> None:
        self.phase = phase

    def finished(self, state) -> tuple[dict, list[dict]] | None:
        done = self.phase.finished()
        if done is None:
            return None
        resume.restore_generators(state.generator, done["generators"])
        logger.debug(f"{self.phase.description}: finished before the interruption, its saved result is used")
        return done["perms"], done["history"]

    def begin(self, state) -> bool:
        snapshot = self.phase.progress()
        if snapshot is None:
            return False
        state.effective.permuters.load_state_dict(snapshot["permuters"])
        state.optimizer.load_state_dict(snapshot["optimizer"])
        state.best_perms = state.place(snapshot["best_perms"])
        state.best, state.history, state.step = snapshot["best"], snapshot["history"], snapshot["step"]
        resume.restore_generators(state.generator, snapshot["generators"])
        logger.info(f"nmperm: {self.phase.description}: resuming at step {state.step} of {state.config.steps}")
        return True

    def after_step(self, state) -> None:
        if state.step < state.config.steps and self.phase.due(state.step):
            self.phase.save_progress(
                {
                    "step": state.step,
                    "permuters": state.effective.permuters.state_dict(),
                    "optimizer": state.optimizer.state_dict(),
                    "best": state.best,
                    "best_perms": state.best_perms,
                    "history": state.history,
                    "generators": resume.generator_states(state.generator),
                }
            )

    def end(self, state) -> None:
        payload = {"perms": state.best_perms, "history": state.history}
        self.phase.finish(payload | {"generators": resume.generator_states(state.generator)})


def resume_callback(description: str) -> ResumeCallback | None:
    """The callback of a learning run while a store is active (:func:`using`), else None."""
    store = resume.active()
    return ResumeCallback(store.begin(description)) if store is not None else None


def default_callbacks(description: str) -> list[LearnCallback]:
    """The process group's and the active resume store's callbacks, where there are any (in that
    order: the ranks check their common start before a saved point is restored)."""
    found = (distributed_callback(description), resume_callback(description))
    return [callback for callback in found if callback is not None]
