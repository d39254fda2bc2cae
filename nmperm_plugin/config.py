"""The one configuration schema of a permutation run.

Every field is declared once here, with its default, help text, allowed values and lower bound.
The ``nmperm`` flags (:mod:`nmperm_plugin.cli.options`), the llm-compressor modifier's fields
(:mod:`nmperm_plugin.llmcompressor.modifier`) and the table in ``docs/configuration.md`` are built from it, so a
new field appears everywhere at once (``tests/test_config.py`` checks that it does).

Step counts are two fields, resolved by the objective when it runs and never written back:
``steps_per_layer`` (layer-wise objectives) and ``end_to_end_steps`` (whole-model objectives). Unset
(None), ``sequences_per_step`` is resolved the same way, by the number of ranks the run has
(:func:`nmperm_plugin.runtime.distributed.sequences_per_step`).
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass, field

from .arch import FOLD_MODES
from .core.nm import NMPattern
from .core.sinkhorn import anneal

FRONT_ENDS = ("cli", "modifier")
# end_to_end steps in all, by fold, when end_to_end_steps is unset (gather learns twice the sites;
# both measured in docs/results.md)
END_TO_END_STEPS = {"exact": 80, "gather": 120}
# sequences in one learning step when sequences_per_step is unset; under torch.distributed it is raised
# to a multiple of the ranks (runtime.distributed.sequences_per_step), so that every rank gets its share
SEQUENCES_PER_STEP = 1


TRAIN_DTYPES = ("auto", "float32", "bfloat16")
CHECKPOINTING = ("auto", "on", "off")
DENSE_TARGETS = ("auto", "keep", "recompute")


@dataclass
class LearnConfig:
    """Hyper-parameters of one learning run (SPEC 2). Built from a :class:`PermuteConfig` when used,
    with the steps its objective resolves; its defaults are the configuration's (``PermuteConfig``
    takes them from here)."""

    steps: int
    lr: float = 0.1
    tau_start: float = 1.0
    tau_end: float = 0.1
    mask_tau: float = 0.5
    sinkhorn_iters: int = 5
    select_every: int = 4
    lr_end: float | None = None  # learning rate at the last step (linear from ``lr``); None: constant
    select_from: float = 0.5  # share of the steps before the first ranking (the start is always ranked)

    def __post_init__(self) -> None:
        for name, value in vars(self).items():  # NaN or inf would make the learning silently do nothing
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value}")

    def ranks(self, step: int) -> bool:
        """Whether the hard permutation after ``step`` steps is ranked: every ``select_every`` steps
        from ``select_from`` of the run on, and after the last step."""
        late = step >= self.select_from * self.steps
        return step == self.steps or (late and step % self.select_every == 0)

    def lr_at(self, step: int) -> float:
        """The learning rate of step ``step`` (from 0): ``lr``, falling linearly to ``lr_end`` when set."""
        return self.lr if self.lr_end is None else anneal(step, self.steps, self.lr, self.lr_end)


def option(
    default,
    help: str,
    choices: tuple[str, ...] | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    front_ends: tuple[str, ...] = FRONT_ENDS,
    modifier_default=dataclasses.MISSING,
    registry: str | None = None,
):
    """A schema field: ``choices`` its allowed values, or ``registry`` the kind of plugin it names
    (checked by :func:`nmperm_plugin.plugins.registry.check_names` when a run starts, since plugins
    add names), ``minimum`` and ``maximum`` inclusive bounds, ``front_ends`` where the field is
    exposed, ``modifier_default`` a different default for the llm-compressor modifier (it then runs
    between pipeline stages)."""
    metadata = dict(
        help=help, choices=choices, registry=registry, minimum=minimum, maximum=maximum, front_ends=front_ends
    )
    if modifier_default is not dataclasses.MISSING:
        metadata["modifier_default"] = modifier_default
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class PermuteConfig:
    """What to permute and prune, and how. ``method="learned"`` starts from ``init`` (a heuristic)."""

    pattern: str = option("2:4", "N:M pattern: keep N of every M consecutive input weights (2:4, 4:8, 1:4)")
    scorer: str = option("wanda", "mask generator whose masks are optimised", registry="mask_generators")
    method: str = option("learned", "learned, or a heuristic solver used alone", registry="methods")
    objective: str = option(
        "auto",
        "what method 'learned' optimises (auto: end_to_end, else the widest window that fits the device)",
        registry="objectives",
    )
    fold: str = option("exact", "exact: standard checkpoint; gather: per-layer run-time gathers", FOLD_MODES)
    block_size: int = option(64, "channels per learnable block (a multiple of M)", minimum=1)
    init: str = option("ria", "heuristic permutation the learner starts from", registry="solvers")
    seed: int = option(0, "random seed of calibration sampling and the learner")
    apply_mask: bool = option(
        True, "apply the final N:M masks (false: permute only, leave masking to a pruner)", modifier_default=False
    )
    reconstruct: bool = option(
        False,
        "apply the masks with the kept weights updated to reproduce each linear's dense outputs (SparseGPT's pass, "
        "then least squares; layer by layer, each layer's inputs from the already pruned ones); needs apply_mask",
    )
    reconstruct_damp: float = option(
        0.01, "reconstruct: dampening added to the Hessian's diagonal, as a share of its mean", minimum=0
    )
    reconstruct_iters: int = option(
        20, "reconstruct: conjugate-gradient iterations after SparseGPT's pass (0: SparseGPT's pass alone)", minimum=0
    )
    distill_steps: int = option(
        0,
        "steps of distillation of the kept weights after the masks, the masks fixed (KL to the dense model plus "
        "alpha times every layer's distance to it; 0: none); needs apply_mask",
        minimum=0,
    )
    distill_lr: float = option(3e-4, "distill_steps: Adam's learning rate at the first step (cosine decay)", minimum=0)
    unstructured: bool = option(False, "per-row mask of the same density instead of N:M (the bound; method identity)")
    ignore: tuple[str, ...] = option(
        (), "regexes of linear names left dense (still permuted)", front_ends=("cli",)
    )  # the modifier has its own, in llm-compressor's syntax
    steps_per_layer: int = option(20, "learner steps per decoder layer (layerwise, retained: per site)", minimum=0)
    end_to_end_steps: int | None = option(
        None,
        "learner steps in all for end_to_end, per window for window and auto (default: 80 with exact, 120 with gather)",
        minimum=0,
    )
    sequences_per_step: int | None = option(
        None,
        "calibration sequences in one learning step (unset: 1, or under torch.distributed the smallest multiple of "
        "the ranks)",
        minimum=1,
    )
    select_sequences: int = option(4, "calibration sequences that rank candidate permutations", minimum=1)
    learn_hidden: bool = option(False, "exact: also learn the global hidden permutation (else the heuristic's)")
    layers_per_step: int = option(4, "decoder layers per step when learning the global hidden site", minimum=1)
    window_layers: int = option(4, "decoder layers in one window of the window objective", minimum=1)
    layer_checkpointing: str = option(
        "auto", "recompute each decoder layer in backward (end_to_end, window; auto: on GPUs)", CHECKPOINTING
    )
    dense_targets: str = option(
        "auto",
        "end_to_end, window: keep every layer's dense output of the calibration data on the CPU, or recompute "
        "each step's (a dense forward more per step; auto: keep when they fit in memory)",
        DENSE_TARGETS,
    )
    shard_weights: bool = option(
        False,
        "under torch.distributed: each rank keeps 1/ranks of every decoder-layer matrix and of its scores, "
        "gathered per layer as it runs (docs/distributed.md)",
    )
    alpha: float = option(0.1, "end_to_end distillation weight", minimum=0)
    train_dtype: str = option(
        "auto", "precision of end_to_end's learning passes (auto: bfloat16 where fast)", TRAIN_DTYPES
    )
    lr: float = option(LearnConfig.lr, "learning rate of the cost matrices at the first step", minimum=0)
    lr_end: float | None = option(
        LearnConfig.lr_end,
        "learning rate at the last step, reached linearly from lr as tau is (unset: lr throughout)",
        minimum=0,
    )
    tau_start: float = option(LearnConfig.tau_start, "Sinkhorn temperature at the first step", minimum=1e-6)
    tau_end: float = option(LearnConfig.tau_end, "Sinkhorn temperature at the last step", minimum=1e-6)
    mask_tau: float = option(LearnConfig.mask_tau, "temperature of the soft N:M mask in backward", minimum=1e-6)
    sinkhorn_iters: int = option(LearnConfig.sinkhorn_iters, "Sinkhorn normalisation rounds", minimum=1)
    select_every: int = option(
        LearnConfig.select_every, "steps between rankings of the current hard permutation", minimum=1
    )
    select_from: float = option(
        LearnConfig.select_from,
        "share of the learner's steps before the first ranking (the start and the last step are always ranked)",
        minimum=0,
        maximum=1,
    )

    def __post_init__(self) -> None:
        pattern = NMPattern.parse(self.pattern)
        object.__setattr__(self, "pattern", str(pattern))
        object.__setattr__(self, "ignore", tuple(self.ignore))
        for spec in dataclasses.fields(self):
            _check_field(spec, getattr(self, spec.name))
        if self.block_size % pattern.m:
            raise ValueError(f"block_size {self.block_size} must be a positive multiple of M in {self.pattern}")
        if self.learn_hidden and (self.method != "learned" or self.fold != "exact" or self.objective == "retained"):
            raise ValueError(
                "learn_hidden applies to method='learned' with fold='exact' (gather has no global site) and a "
                "data-driven objective (layerwise, end_to_end or staged)"
            )
        if self.unstructured and self.method != "identity":
            raise ValueError("unstructured masks need no permutation: use method='identity'")
        if self.distill_steps and not self.apply_mask:
            raise ValueError(
                "distill_steps trains the kept weights once the masks are applied: it needs apply_mask true"
            )
        if self.reconstruct and not self.apply_mask:
            raise ValueError(
                "reconstruct updates the kept weights as the masks are applied: it needs apply_mask true (in a "
                "recipe, the modifier then prunes and no SparseGPTModifier or WandaPruningModifier follows it)"
            )

    @property
    def nm(self) -> NMPattern:
        return NMPattern.parse(self.pattern)

    @property
    def total_steps(self) -> int:
        """``end_to_end_steps``, or its default for this fold."""
        return END_TO_END_STEPS[self.fold] if self.end_to_end_steps is None else self.end_to_end_steps

    def learner(self, steps: int) -> LearnConfig:
        """The learner's hyper-parameters for a run of ``steps`` steps."""
        return LearnConfig(
            steps, self.lr, self.tau_start, self.tau_end, self.mask_tau, self.sinkhorn_iters, self.select_every,
            self.lr_end, self.select_from,
        )  # fmt: skip


def _check_field(spec: dataclasses.Field, value) -> None:
    """One check of every field: its type's sense (a finite number, valid regular expressions), its
    choices and its bounds."""
    choices, minimum, maximum = (spec.metadata[k] for k in ("choices", "minimum", "maximum"))
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{spec.name} must be a finite number, got {value} (--{spec.name.replace('_', '-')})")
    if spec.name == "ignore":
        for pattern in value:
            try:
                re.compile(pattern)
            except (re.error, TypeError) as error:
                raise ValueError(
                    f"ignore (--ignore) {pattern!r} is not a valid regular expression ({error}): escape special "
                    r"characters, e.g. 'model\.layers\.0\.mlp'"
                ) from None
    if choices is not None and value not in choices:
        raise ValueError(f"unknown {spec.name} {value!r}; choose one of {', '.join(choices)}")
    if minimum is not None and value is not None and value < minimum:
        raise ValueError(f"{spec.name} must be at least {minimum:g}, got {value}")
    if maximum is not None and value is not None and value > maximum:
        raise ValueError(f"{spec.name} must be at most {maximum:g}, got {value}")


def schema(front_end: str | None = None) -> list[dataclasses.Field]:
    """The fields of :class:`PermuteConfig` (those exposed by ``front_end``, when given)."""
    fields = dataclasses.fields(PermuteConfig)
    return [f for f in fields if front_end is None or front_end in f.metadata["front_ends"]]


def field_types() -> dict[str, type]:
    """Each field's resolved annotation (``str``, ``int | None``, ...)."""
    return typing.get_type_hints(PermuteConfig)


def default_of(spec: dataclasses.Field, front_end: str):
    """The default of ``spec`` in ``front_end``."""
    return spec.metadata.get("modifier_default", spec.default) if front_end == "modifier" else spec.default


def _bounds(minimum: float | None, maximum: float | None) -> str:
    """A field's allowed range for the docs table: ``>= 0``, ``<= 1``, ``0 to 1`` or nothing."""
    if minimum is not None and maximum is not None:
        return f"{minimum:g} to {maximum:g}"
    if minimum is not None:
        return f">= {minimum:g}"
    return "" if maximum is None else f"<= {maximum:g}"


def markdown_table(names: Callable[[str], tuple[str, ...]]) -> str:
    """The fields as a markdown table (``docs/configuration.md`` holds it; a test keeps it current);
    ``names(kind)`` lists the registered plugins a registry-backed field accepts."""
    rows = ["| field | CLI flag | default | allowed | meaning |", "|---|---|---|---|---|"]
    for spec in schema():
        flag = f"`--{spec.name.replace('_', '-')}`" if "cli" in spec.metadata["front_ends"] else "(not a flag)"
        default = spec.default if spec.default != () else "none"
        if "modifier_default" in spec.metadata:
            default = f"{default} (modifier: {spec.metadata['modifier_default']})"
        if spec.metadata["registry"] is not None:
            allowed = ", ".join(names(spec.metadata["registry"]))
        elif spec.metadata["choices"] is not None:
            allowed = ", ".join(spec.metadata["choices"])
        else:
            allowed = _bounds(spec.metadata["minimum"], spec.metadata["maximum"])
        rows.append(f"| `{spec.name}` | {flag} | `{default}` | {allowed} | {spec.metadata['help']} |")
    return "\n".join(rows)
