"""``LearnedPermutationModifier``: learned N:M channel permutations as an llm-compressor modifier.

Importing this module registers the class with llm-compressor's ``ModifierFactory`` (recipes name
it as ``LearnedPermutationModifier``); ``import nmperm_plugin`` does that when llm-compressor is
installed. The algorithm is :func:`nmperm_plugin.api.permute_`; the glue is in
:mod:`nmperm_plugin.compress`.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from llmcompressor.core import State, active_session
from llmcompressor.modifiers import Modifier, ModifierFactory
from loguru import logger
from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveInt, PrivateAttr, field_validator, model_validator

from .api import permute_
from .arch import FOLD_MODES
from .compress import PermutedState, attach, calibration_ids, check_recipe, check_unpermuted, ignored_linears
from .hooks import get_mask_generator, solvers
from .learn import LearnConfig
from .nm import NMPattern
from .objectives import TRAIN_DTYPES
from .pipeline import OBJECTIVES, PermuteConfig, PruneResult
from .sidecar import Sidecar

__all__ = ["LearnedPermutationModifier"]


def _choice(name: str, value: str, allowed) -> str:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(allowed)}")
    return value


class LearnedPermutationModifier(Modifier):
    """
    Learns input-channel permutations for N:M (2:4) sparsity over the whole model and folds them
    into the weights, so that the next pruner finds better N:M masks (Li et al., "Learnable
    Permutation for Structured Sparsity on Transformer Models", arXiv 2601.22980). With
    ``fold: exact`` and ``apply_mask: false`` the model computes the same function afterwards.

    Sample yaml:

    ```yaml
    sparsity_stage:
      sparsity_modifiers:
        LearnedPermutationModifier:
          pattern: "2:4"
          scorer: wanda
          objective: layerwise
          fold: exact
          block_size: 64
          epochs: 2
          ignore: ["re:.*lm_head"]
        WandaPruningModifier:
          sparsity: 0.5
          mask_structure: "2:4"
          ignore: ["re:.*lm_head"]
    ```

    Lifecycle:

    - on_initialize (before any pipeline runs, so before every other modifier calibrates)
        - check the recipe (this modifier before pruners and quantizers, same N:M pattern)
        - collect the calibration ``input_ids`` from ``state.data.calib``
        - ``permute_``: its own sequential pass, learn, (apply_mask) prune, fold, verify
        - wrap ``model.save_pretrained`` to write the sidecar ``nmperm.json``
    - no calibration hooks: with the ``independent`` pipeline it gets a data-free turn, and in one
      shared ``sequential`` pipeline the pruners' statistics are taken on the permuted model

    :param pattern: N:M pattern, e.g. ``"2:4"`` or ``"4:8"``; a downstream pruner's
        ``mask_structure`` must be the same
    :param scorer: mask generator whose masks are optimised: ``wanda`` (for WandaPruningModifier),
        ``sparsegpt`` (Hessian-aware, for SparseGPTModifier), ``magnitude``, ``ria``, or any
        generator registered through the ``nmperm_mask_generators`` plugin hook
    :param method: ``learned`` (default), or a heuristic: ``identity``, ``allocation``, ``ria``, ``swap``
    :param objective: what the learner optimises: ``layerwise`` (decoder-layer outputs),
        ``retained`` (kept score), ``end_to_end`` (cross-entropy plus distillation, whole model; the most
        accurate measured, memory grows with the whole model), ``staged`` (layerwise, then end_to_end)
    :param init: heuristic permutation the learner starts from
    :param fold: ``exact`` (standard, vLLM-ready checkpoint) or ``gather`` (per-layer permutations
        kept as gathers; needs ``apply_mask: true``; saving needs ``allow_gather_checkpoint``)
    :param block_size: channels per learnable block (a multiple of M)
    :param epochs: passes over the calibration sequences per decoder layer: the learner takes
        ``ceil(epochs * sequences / sequences_per_step)`` steps per layer. Give ``epochs`` or
        ``steps``, not both; with neither, the objective's default (20 per layer; for ``end_to_end`` 80 in
        all with ``fold: exact``, 120 with ``gather``)
    :param steps: learner steps per decoder layer (or in total for ``end_to_end``)
    :param lr: learning rate of the cost matrices
    :param sequences_per_step: calibration sequences in one learning step
    :param select_sequences: calibration sequences that rank candidate permutations
    :param max_sequences: use at most this many calibration sequences (the pass keeps every
        layer's dense output in memory); None uses all that the pipeline gives
    :param alpha: distillation weight of the ``end_to_end`` objective
    :param train_dtype: precision of ``end_to_end``'s learning passes: ``auto`` (bfloat16 where the
        hardware multiplies it fast: CUDA with bfloat16, CPUs with AMX), ``float32`` or ``bfloat16``;
        candidates are always ranked in the model's own precision
    :param apply_mask: apply the final N:M masks with ``scorer`` (e.g. magnitude or ria 2:4,
        which stock llm-compressor cannot do in oneshot); false leaves masking to the next pruner
    :param ignore: linears left dense (still permuted), in llm-compressor syntax: exact module
        names, ``re:`` regexes, class names
    :param seed: random seed of the learner
    :param allow_gather_checkpoint: save a ``fold: gather`` model anyway, as a non-standard
        checkpoint (original channel order plus the sidecar) for ``nmperm export``
    """

    pattern: str = PermuteConfig.pattern
    scorer: str = PermuteConfig.scorer
    method: str = PermuteConfig.method
    objective: str = PermuteConfig.objective
    init: str = PermuteConfig.init
    fold: str = PermuteConfig.fold
    block_size: PositiveInt = PermuteConfig.block_size
    epochs: PositiveInt | None = None
    steps: NonNegativeInt | None = None
    lr: NonNegativeFloat = LearnConfig.lr
    sequences_per_step: PositiveInt = PermuteConfig.sequences_per_step
    select_sequences: PositiveInt = PermuteConfig.select_sequences
    max_sequences: PositiveInt | None = 32
    alpha: NonNegativeFloat = PermuteConfig.alpha
    train_dtype: str = PermuteConfig.train_dtype
    apply_mask: bool = False
    ignore: list[str] = Field(default_factory=list)
    seed: int = 0
    allow_gather_checkpoint: bool = False

    _sidecar: Sidecar | None = PrivateAttr(default=None)
    _result: PruneResult | None = PrivateAttr(default=None)

    @field_validator("pattern")
    @classmethod
    def _valid_pattern(cls, value: str) -> str:
        return str(NMPattern.parse(value))

    @field_validator("scorer")
    @classmethod
    def _valid_scorer(cls, value: str) -> str:
        get_mask_generator(value)
        return value

    @field_validator("method")
    @classmethod
    def _valid_method(cls, value: str) -> str:
        return _choice("method", value, (*solvers(), "learned"))

    @field_validator("init")
    @classmethod
    def _valid_init(cls, value: str) -> str:
        return _choice("init", value, tuple(solvers()))

    @field_validator("objective")
    @classmethod
    def _valid_objective(cls, value: str) -> str:
        return _choice("objective", value, OBJECTIVES)

    @field_validator("fold")
    @classmethod
    def _valid_fold(cls, value: str) -> str:
        return _choice("fold", value, FOLD_MODES)

    @field_validator("train_dtype")
    @classmethod
    def _valid_train_dtype(cls, value: str) -> str:
        return _choice("train_dtype", value, TRAIN_DTYPES)

    @model_validator(mode="after")
    def _consistent(self) -> LearnedPermutationModifier:
        if self.epochs is not None and self.steps is not None:
            raise ValueError("give epochs or steps, not both")
        if self.fold == "gather" and not self.apply_mask:
            raise ValueError(
                "fold 'gather' needs apply_mask: true: its per-layer permutations cannot be folded, so only this "
                "modifier can apply masks in their order (a downstream pruner would prune the original order)"
            )
        self.permute_config(num_sequences=1)  # PermuteConfig's own checks (block_size against M, ...)
        return self

    # -- configuration ------------------------------------------------------------------------------
    def learner_steps(self, num_sequences: int) -> int | None:
        """``steps``, or ``ceil(epochs * sequences / sequences_per_step)``; None leaves the objective's default."""
        if self.steps is not None or self.epochs is None:
            return self.steps
        return math.ceil(self.epochs * num_sequences / min(self.sequences_per_step, num_sequences))

    def permute_config(self, num_sequences: int, ignore: tuple[str, ...] = ()) -> PermuteConfig:
        return PermuteConfig(
            pattern=self.pattern,
            scorer=self.scorer,
            method=self.method,
            objective=self.objective,
            fold=self.fold,
            block_size=self.block_size,
            init=self.init,
            seed=self.seed,
            apply_mask=self.apply_mask,
            ignore=ignore,
            sequences_per_step=self.sequences_per_step,
            select_sequences=self.select_sequences,
            alpha=self.alpha,
            train_dtype=self.train_dtype,
            learn=LearnConfig(steps=self.learner_steps(num_sequences), lr=self.lr),
        )

    @property
    def sidecar(self) -> Sidecar | None:
        """Permutations, pattern and figures of the last run (also written beside the checkpoint)."""
        return self._sidecar

    @property
    def result(self) -> PruneResult | None:
        """The raw result of the last run (learning curves)."""
        return self._result

    # -- lifecycle ----------------------------------------------------------------------------------
    def on_initialize(self, state: State, **kwargs) -> bool:
        model = state.model
        modifiers = _recipe_of(self)
        check_recipe(self, modifiers)
        check_unpermuted(model)
        input_ids = calibration_ids(state.data.calib, self.max_sequences)
        config = self.permute_config(len(input_ids), ignored_linears(model, self.ignore))
        logger.info(
            f"LearnedPermutationModifier: {len(input_ids)} x {input_ids.shape[1]} calibration tokens, "
            f"{config.learn.steps} learner steps {'in all' if config.objective == 'end_to_end' else 'per layer'}"
        )
        device = next(model.parameters()).device
        with _keep_requires_grad(model):
            self._sidecar, self._result = permute_(model, input_ids.to(device), config)
        names = [type(m).__name__ for m in modifiers]
        attach(model, PermutedState(self._sidecar, self._result.pruned, self.allow_gather_checkpoint, names))
        return True


def _recipe_of(modifier: Modifier) -> list[Modifier]:
    """The modifiers of the recipe being initialised, if ``modifier`` is one of them (else just it)."""
    modifiers = list(active_session().lifecycle.recipe.modifiers or [])
    return modifiers if any(m is modifier for m in modifiers) else [modifier]


@contextmanager
def _keep_requires_grad(model: torch.nn.Module):
    """Restore every parameter's ``requires_grad`` after the permutation pass (it freezes them)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


ModifierFactory.register("LearnedPermutationModifier", LearnedPermutationModifier)
