"""The figures every benchmark table reports, defined once.

**Gap closed** (the headline of every N:M table): the share of the log-perplexity gap between the
N:M baseline (the pruner with no permutation) and the same pruner unstructured at the same sparsity
that a method closes, computed on the **median perplexity of each row across seeds**::

    gap_closed = (ln ppl_base - ln ppl_method) / (ln ppl_base - ln ppl_unstructured)

Per-seed shares (each seed against that seed's own baseline and unstructured runs) are extra
information only (:func:`gap_closed_per_seed`); a table's headline is :func:`gap_closed_of_medians`.

**Recovery**: the same share with the dense model in place of the unstructured bound (the published
papers' measure, for the anchors).

**Penalty** (for methods that update weights, such as SparseGPT, where the unstructured run may not
be the far end): ``ln(ppl / ppl_dense)``, the log-perplexity cost of a pruned model over the dense
one; a row's penalty as a fraction of a reference row's is :func:`penalty_fraction`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping

GAP_CLOSED_DEFINITION = (
    "gap closed = (ln ppl_base - ln ppl_method) / (ln ppl_base - ln ppl_unstructured) on the median perplexity "
    "of each row across seeds, where base is the N:M pruner without permutation and unstructured the same "
    "pruner at the same sparsity without the N:M structure"
)
PENALTY_DEFINITION = "penalty = ln(ppl / ppl_dense); a row's fraction of a reference row's penalty is their ratio"


def share_closed(base: float, ppl: float, target: float) -> float:
    """Share of the log-perplexity distance from ``base`` to ``target`` that ``ppl`` covers."""
    return (math.log(base) - math.log(ppl)) / (math.log(base) - math.log(target))


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def gap_closed(base: float, method: float, unstructured: float) -> float:
    """The gap closed by perplexity ``method`` between ``base`` (N:M, no permutation) and
    ``unstructured``; call it with the rows' medians (:func:`gap_closed_of_medians`)."""
    return share_closed(base, method, unstructured)


def gap_closed_of_medians(base: Iterable[float], method: Iterable[float], unstructured: Iterable[float]) -> float:
    """The headline: :func:`gap_closed` of each row's median perplexity across seeds."""
    return gap_closed(median(base), median(method), median(unstructured))


def gap_closed_per_seed(
    base: Mapping[int, float], method: Mapping[int, float], unstructured: Mapping[int, float]
) -> dict[int, float]:
    """Extra information: each seed's share against its own baseline and unstructured runs (seeds
    with all three rows only)."""
    seeds = sorted(set(base) & set(method) & set(unstructured))
    return {seed: gap_closed(base[seed], method[seed], unstructured[seed]) for seed in seeds}


def recovery(base: float, method: float, dense: float) -> float:
    """Share of the log-perplexity gap between ``base`` and ``dense`` that ``method`` closes."""
    return share_closed(base, method, dense)


def penalty(ppl: float, dense: float) -> float:
    """``ln(ppl / dense)``: the log-perplexity cost of a pruned model over the dense one."""
    return math.log(ppl / dense)


def penalty_fraction(ppl: float, reference: float, dense: float) -> float:
    """A row's penalty as a fraction of ``reference``'s (e.g. SparseGPT+permutation over SparseGPT)."""
    return penalty(ppl, dense) / penalty(reference, dense)
