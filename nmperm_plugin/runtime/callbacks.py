"""What the learner (:func:`nmperm_plugin.learn.learner.learn`) calls at fixed points of a learning
run, so that resuming (:mod:`.resume`) and several ranks (:mod:`.distributed`) plug into it without
branches in the learning loop.

A callback sees the run's state (``state``: the effective weights, the optimizer, the random
generator the objective draws from, the step reached, the best hard permutations and their
ranking, the learning curve) and may change it; every method does nothing by default.
"""

from __future__ import annotations


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
