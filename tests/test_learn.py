"""The learner's schedules: the learning rate's decay and which steps rank their hard permutation."""

import pytest
import torch
from torch import nn

from nmperm_plugin import PermuteConfig
from nmperm_plugin.core.nm import NMPattern
from nmperm_plugin.core.permuter import BlockPermuter
from nmperm_plugin.learn.learner import EffectiveWeights, LearnConfig, Member, RetainedObjective, learn

PATTERN = NMPattern(2, 4)


def _learn(config: LearnConfig, final: list | None = None) -> list[dict]:
    """The learning curve of ``config`` on a retained-score site; ``final`` gets the cost matrices."""
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(8, 32, generator=generator)
    member = Member("weight", scores, scores, "site")
    permuters = nn.ModuleDict({"site": BlockPermuter(torch.arange(32), 16, generator=generator)})
    effective = EffectiveWeights([member], permuters, pattern=PATTERN)
    _, history = learn(effective, RetainedObjective([member], PATTERN), config)
    if final is not None:
        final.append(permuters["site"].logits.detach().clone())
    return history


def _ranked(history: list[dict]) -> list[int]:
    return [h["step"] for h in history if h["select"] is not None]


def test_select_from_ranks_only_the_late_steps_the_start_and_the_last():
    assert _ranked(_learn(LearnConfig(steps=8, select_every=2, select_from=0.0))) == [0, 2, 4, 6, 8]
    assert _ranked(_learn(LearnConfig(steps=8, select_every=2))) == [0, 4, 6, 8]  # from half the run (default)
    assert _ranked(_learn(LearnConfig(steps=9, select_every=4, select_from=0.5))) == [0, 8, 9]
    assert _ranked(_learn(LearnConfig(steps=8, select_every=2, select_from=1.0))) == [0, 8]


def test_ranking_late_leaves_the_trajectory_as_it_was():
    final = []
    every, late = (_learn(LearnConfig(steps=8, select_every=1, select_from=s, lr=0.5), final) for s in (0.0, 0.5))
    assert not torch.equal(final[0], torch.eye(16))  # it learned something
    torch.testing.assert_close(final[0], final[1], rtol=0, atol=0)
    assert [h["loss"] for h in every] == [h["loss"] for h in late]
    assert [h["select"] for h in late if h["select"] is not None] == [every[s]["select"] for s in _ranked(late)]


def test_lr_end_decays_the_learning_rate_linearly_and_moves_the_cost_matrices_less():
    final = []
    constant, decayed = (_learn(LearnConfig(steps=5, lr=0.5, lr_end=end), final) for end in (None, 0.1))
    assert [h["lr"] for h in constant[1:]] == [0.5] * 5
    assert [h["lr"] for h in decayed[1:]] == pytest.approx([0.5, 0.4, 0.3, 0.2, 0.1])
    start = torch.eye(16)  # BlockPermuter's start: the identity plus noise of 0.01
    moved = [(logits - start).abs().sum() for logits in final]
    assert moved[1] < 0.8 * moved[0]  # Adam's steps are about lr each: 1.5 in all against 2.5


def test_schedule_fields_reach_the_learner_and_are_checked():
    default = PermuteConfig().learner(10)
    assert default == LearnConfig(10)  # one set of defaults
    assert (default.lr, default.lr_end, default.select_from) == (0.1, None, 0.5)
    assert (default.lr_at(0), default.lr_at(9)) == (0.1, 0.1)
    learner = PermuteConfig(lr=0.2, lr_end=0.02, select_from=0.25).learner(10)
    assert (learner.lr_at(0), learner.lr_at(9), learner.select_from) == pytest.approx((0.2, 0.02, 0.25))
    with pytest.raises(ValueError, match="select_from must be at most 1, got 1.5"):
        PermuteConfig(select_from=1.5)
    with pytest.raises(ValueError, match="select_from must be at least 0"):
        PermuteConfig(select_from=-0.1)
    with pytest.raises(ValueError, match="lr_end must be at least 0"):
        PermuteConfig(lr_end=-0.1)
