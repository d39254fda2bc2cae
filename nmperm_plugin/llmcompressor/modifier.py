"""``LearnedPermutationModifier``: learned N:M channel permutations as an llm-compressor modifier.

Importing this module registers the class with llm-compressor's ``ModifierFactory`` (recipes name
it as ``LearnedPermutationModifier``); ``import nmperm_plugin`` does that when llm-compressor is
installed. The algorithm is :func:`nmperm_plugin.api.permute_`; the glue is in
:mod:`nmperm_plugin.llmcompressor.compress`.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Literal

import torch
from llmcompressor.core import State, active_session
from llmcompressor.modifiers import Modifier, ModifierFactory
from llmcompressor.utils.dev import get_main_device
from loguru import logger
from pydantic import Field, PositiveInt, PrivateAttr, create_model, field_validator, model_validator

from ..api import permute_
from ..config import PermuteConfig, default_of, field_types, schema
from ..io.sidecar import Sidecar
from ..learn import parts as vl_parts
from ..learn.pipeline import PruneResult, strategy_of
from ..plugins.registry import check_names
from ..runtime import distributed, resume
from ..runtime.onload import execution_device, storage_device, undispatched
from .compress import PermutedState, attach, calibration_data, check_recipe, check_unpermuted, ignored_linears

__all__ = ["LearnedPermutationModifier"]

VISION_NEEDS_IMAGES = (
    "parts vision: the vision tower calibrates on images, and the calibration dataloader gives token ids only: pass "
    "oneshot a dataset of the model processor's outputs (input_ids, pixel_values, image_grid_thw; one image per "
    "sample, every sample of one layout) and a data_collator that stacks them, or prune parts ['text']"
)


class _ModifierBase(Modifier):
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
          objective: auto
          apply_mask: true  # the learned masks (measured better than the next pruner's own)
          fold: exact
          block_size: 64
          ignore: ["re:.*lm_head"]
          parts: ["text"]  # a Qwen2.5-VL / Qwen2-VL model: ["vision", "text"] prunes its vision tower too
        WandaPruningModifier:
          sparsity: 0.5
          mask_structure: "2:4"
          ignore: ["re:.*lm_head"]
    ```

    Lifecycle:

    - on_initialize (before any pipeline runs, so before every other modifier calibrates)
        - check the recipe (this modifier before pruners and quantizers, same N:M pattern)
        - collect the calibration data from ``state.data.calib`` (token ids, or model-input samples)
        - ``permute_`` (a Qwen-VL model: ``permute_parts_`` over ``parts``): its own sequential pass,
          learn, (apply_mask) prune, fold, verify, computing
          where oneshot computes (llm-compressor's main device: a GPU when there is one), one
          decoder layer onloaded at a time when the weights are kept on the CPU
        - wrap ``model.save_pretrained`` to write the sidecar ``nmperm.json``
    - no calibration hooks: with the ``independent`` pipeline it gets a data-free turn, and in one
      shared ``sequential`` pipeline the pruners' statistics are taken on the permuted model

    The modifier's own fields:

    :param epochs: passes over the calibration sequences: the learner takes
        ``ceil(epochs * sequences / sequences_per_step)`` steps (per decoder layer for layer-wise
        objectives, in all for ``end_to_end``); give it or the step fields, not both
    :param max_sequences: use at most this many calibration sequences; None uses all that the
        pipeline gives
    :param ignore: linears left dense (still permuted), in llm-compressor syntax: exact module
        names, ``re:`` regexes, class names (matched against the whole model's names, the vision
        tower's linears included: ``re:model\\.visual\\.blocks\\.[0-3]\\.``)
    :param parts: what to prune of a Qwen2.5-VL or Qwen2-VL model: ``["text"]`` (the text decoder,
        as the paper; default), ``["vision"]`` (the vision tower), or both (the tower first, so the
        decoder calibrates on its pruned image features); the vision tower needs image calibration
        batches. Any other model is pruned whole, with the default; ``vision`` is refused for it
    :param allow_gather_checkpoint: save a ``fold: gather`` model anyway, as a non-standard
        checkpoint (original channel order plus the sidecar) for ``nmperm export``
    :param learning_state: a directory named ``*.nmperm-state`` where the learning state is saved
        every few steps; running the same recipe on the same model and data again resumes from it
        with the result of an uninterrupted run (a different setup is refused with what differs).
        It is deleted once ``save_pretrained`` has written the model. None: not resumable

    The fields of the configuration schema (:class:`nmperm_plugin.config.PermuteConfig`,
    ``docs/configuration.md``), with ``apply_mask`` false by default (the next pruner masks):
    """

    epochs: PositiveInt | None = None
    max_sequences: PositiveInt | None = 32
    ignore: list[str] = Field(default_factory=list)
    allow_gather_checkpoint: bool = False
    learning_state: str | None = None
    parts: list[Literal["vision", "text"]] = Field(default_factory=lambda: list(vl_parts.DEFAULT_PARTS))

    _sidecar: Sidecar | None = PrivateAttr(default=None)
    _result: PruneResult | None = PrivateAttr(default=None)

    @field_validator("parts", mode="before")
    @classmethod
    def _parts_text(cls, parts):
        return [part.strip() for part in parts.split(",")] if isinstance(parts, str) else parts  # "vision,text"

    @field_validator("parts")
    @classmethod
    def _parts(cls, parts: list[str]) -> list[str]:
        return list(vl_parts.parse_parts(parts))  # one order: the tower first, as it runs

    @model_validator(mode="after")
    def _consistent(self) -> _ModifierBase:
        defaults = {spec.name: default_of(spec, "modifier") for spec in schema("modifier")}
        stepped = any(getattr(self, name) != defaults[name] for name in ("steps_per_layer", "end_to_end_steps"))
        if self.epochs is not None and stepped:  # compared with the defaults: a saved recipe.yaml lists them all
            raise ValueError("give epochs or steps_per_layer / end_to_end_steps, not both")
        if self.fold == "gather" and not self.apply_mask:
            raise ValueError(
                "fold 'gather' needs apply_mask: true: its per-layer permutations cannot be folded, so only this "
                "modifier can apply masks in their order (a downstream pruner would prune the original order)"
            )
        if self.learning_state is not None and not self.learning_state.rstrip("/").endswith(resume.SUFFIX):
            raise ValueError(
                f"learning_state {self.learning_state!r} must name a directory ending in {resume.SUFFIX!r} (e.g. "
                f"'out{resume.SUFFIX}' beside the output), so that it is never mistaken for, or deleted as, other data"
            )
        check_names(self.permute_config(num_sequences=1))  # the schema's checks, then the plugin names
        return self

    # -- configuration ------------------------------------------------------------------------------
    def epoch_steps(self, num_sequences: int) -> int | None:
        """``ceil(epochs * sequences / sequences_per_step)``; None without ``epochs``."""
        if self.epochs is None:
            return None
        per_step = distributed.sequences_per_step(self.sequences_per_step, log=False)  # unset: by the ranks
        return math.ceil(self.epochs * num_sequences / min(per_step, num_sequences))

    def permute_config(self, num_sequences: int, ignore: tuple[str, ...] = ()) -> PermuteConfig:
        """The run's :class:`PermuteConfig`: the schema fields as given, ``epochs`` turned into steps
        (per layer and in all), ``ignore`` as resolved module-name regexes."""
        values = {spec.name: getattr(self, spec.name) for spec in schema("modifier")}
        steps = self.epoch_steps(num_sequences)
        if steps is not None:
            values |= {"steps_per_layer": steps, "end_to_end_steps": steps}
        return PermuteConfig(**values, ignore=ignore)

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
        vl_parts.check_parts(self.parts, model)
        calibration = calibration_data(state.data.calib, self.max_sequences)
        if "vision" in self.parts and torch.is_tensor(calibration):
            raise ValueError(VISION_NEEDS_IMAGES)
        config = self.permute_config(len(calibration), ignored_linears(model, self.ignore))
        what = (
            f"{len(calibration)} x {calibration.shape[1]} calibration tokens"
            if torch.is_tensor(calibration)
            else f"{len(calibration)} calibration samples ({', '.join(calibration[0])})"
        )
        chosen = f"parts {', '.join(self.parts)}, " if vl_parts.has_vision_tower(model) else ""
        logger.info(
            f"LearnedPermutationModifier: {chosen}{what}, "
            f"{strategy_of(config).describe(config) if config.method == 'learned' else config.method}"
        )
        with undispatched(model) as onload_device, _keep_requires_grad(model):
            device = execution_device(onload_device or get_main_device())  # where oneshot runs the layers
            if device != storage_device(model):
                logger.info(
                    f"LearnedPermutationModifier: learning on {device}, the weights staying on "
                    f"{storage_device(model)} (one decoder layer onloaded at a time)"
                )
            store = None
            if self.learning_state:  # one state for every part's run, in order; removed once the output is saved
                setup = vl_parts.fingerprint(model, calibration, config, self.parts, device)
                store = resume.ResumeStore(self.learning_state, setup).open()
            self._sidecar, self._result = permute_(model, calibration, config, device, parts=self.parts, state=store)
        names = [type(m).__name__ for m in modifiers]
        state = PermutedState(self._sidecar, self._result.pruned, self.allow_gather_checkpoint, names, store)
        attach(model, state)
        return True


def _schema_fields() -> dict:
    """The configuration schema's fields as pydantic fields (validated together by PermuteConfig)."""
    types_ = field_types()
    return {
        spec.name: (types_[spec.name], Field(default_of(spec, "modifier"), description=spec.metadata["help"]))
        for spec in schema("modifier")
    }


LearnedPermutationModifier = create_model(
    "LearnedPermutationModifier",
    __base__=_ModifierBase,
    __module__=__name__,
    __doc__=_ModifierBase.__doc__,
    **_schema_fields(),
)


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
