"""evaluation/selection.py: every rule on hand-made rounds, ties, early stops, and the engine's own rule."""
import math

import numpy as np
import pytest

from evaluation.selection import EpisodeRounds, Rule, choose, oracle_choice, round_counts, rule_set, select_all
from model.round_selection import best_round


def counts(inter_fg: int, union_fg: int, inter_bg: int = 300, union_bg: int = 350) -> list[list[int]]:
    return [[inter_bg, inter_fg], [union_bg, union_fg], [330, 50]]


def episode(fg: list[tuple[int, int]], scores, gt_scores=None, zero=(10, 100)) -> EpisodeRounds:
    return EpisodeRounds(counts(*zero), [counts(*c) for c in fg], scores, gt_scores)


@pytest.mark.parametrize("scores, chosen", [
    ([0.5, 0.7, 0.6], 2),
    ([0.5, 0.5, 0.3], 2),          # a tie goes to the later round
    ([0.4, 0.4, 0.4, 0.4], 4),
    ([0.0, 0.0], 2),               # round 1 is taken even with score 0 (best starts at 0, >=)
    ([0.3, 0.1, 0.2], 1),
    ([math.nan, 0.2], 2),          # NaN is never >=, as in the engine
    ([math.nan], 0),               # ... so the zero round comes back only then
])
def test_s2q_choice_is_the_engines_rule(scores, chosen):
    assert best_round(scores) == chosen


def test_oracle_takes_best_fg_iou_ties_to_later_round():
    assert oracle_choice(np.array([counts(10, 100), counts(30, 100), counts(20, 100)])) == 2
    # 1/2 and 2/4 are the same IoU: a tie, so the later round.
    assert oracle_choice(np.array([counts(1, 2), counts(2, 4), counts(1, 3)])) == 2
    assert oracle_choice(np.array([counts(0, 0), counts(0, 5)])) == 2  # empty union is IoU 0: a tie


def test_rule_set_order_and_label_flags():
    rules = rule_set(3, with_gt_scores=True)
    assert [r.name for r in rules] == ["zero", "s2q", "s2q_stop", "s2q_gt", "last", "round_1", "round_2", "round_3",
                                       "oracle"]
    with_votes = [r.name for r in rule_set(3, with_gt_scores=False, with_votes=True)]
    assert with_votes[:6] == ["zero", "s2q", "s2q_stop", "soft_vote", "s2q_vote", "stop_vote"]
    assert {r.name for r in rules if r.reads_labels} == {"s2q_gt", "oracle"}
    assert "s2q_gt" not in [r.name for r in rule_set(3, with_gt_scores=False)]
    with pytest.raises(ValueError):
        rule_set(0, True)


def test_every_rule_on_hand_made_rounds():
    episodes = [
        episode([(20, 100), (40, 100), (30, 100)], [0.5, 0.4, 0.6], [0.5, 0.7, 0.2]),
        episode([(50, 100), (50, 100), (45, 100)], [0.2, 0.2, 0.1], [0.3, 0.9, 0.9]),
    ]
    selected = select_all(episodes, 3, with_gt_scores=True)
    expected = {"zero": [0, 0], "s2q": [3, 2], "s2q_stop": [1, 2], "s2q_gt": [2, 3], "last": [3, 3], "round_1": [1, 1],
                "round_2": [2, 2], "round_3": [3, 3], "oracle": [2, 2]}
    assert {k: v.chosen.tolist() for k, v in selected.items()} == expected
    for name, selection in selected.items():
        for e, chosen, got in zip(episodes, selection.chosen, selection.counts):
            assert got.tolist() == e.counts(chosen).tolist(), name
    assert selected["s2q"].histogram(3) == [0, 0, 1, 1]
    assert selected["oracle"].rule.reads_labels and not selected["last"].rule.reads_labels


def test_early_stopped_episode_keeps_its_last_round():
    stopped = episode([(20, 100), (60, 100)], [0.5, 0.3], [0.1, 0.2])  # 2 of 4 rounds
    selected = select_all([stopped], 4, with_gt_scores=True)
    assert selected["last"].chosen.tolist() == [2]
    assert selected["round_3"].chosen.tolist() == [2] and selected["round_4"].chosen.tolist() == [2]
    assert selected["round_1"].chosen.tolist() == [1]
    assert selected["oracle"].chosen.tolist() == [2] and selected["s2q"].chosen.tolist() == [1]
    table = round_counts([stopped], 4)
    assert table.shape == (1, 5, 3, 2)
    assert table[0, 0].tolist() == stopped.zero.tolist()
    assert all(table[0, r].tolist() == stopped.rounds[1].tolist() for r in (2, 3, 4))


def test_missing_ground_truth_scores_and_bad_lengths_are_refused():
    plain = episode([(20, 100)], [0.5])
    with pytest.raises(ValueError, match="ground-truth"):
        select_all([plain], 1, with_gt_scores=True)
    with pytest.raises(ValueError, match="scores"):
        episode([(20, 100), (30, 100)], [0.5])
    with pytest.raises(ValueError, match="unknown"):
        choose(Rule("best_guess", False, ""), plain)


def test_s2q_rule_is_the_engines_function():
    """One implementation: the evaluation's s2q rule applies the engine's own function."""
    from evaluation import selection
    from model import round_selection

    assert selection.ROUND_RULES is round_selection.ROUND_RULES and selection.best_round is round_selection.best_round
    assert choose(Rule("s2q", False, ""), episode([(1, 2), (2, 3), (1, 3)], [0.2, 0.6, 0.6])) == 3


def test_s2q_rule_reproduces_the_engines_choice():
    """On a real (small, random) model, in runs whose best rounds differ: the rule applied to the
    recorded scores picks the engine's round, and that round's prediction is the engine's answer."""
    torch = pytest.importorskip("torch")
    from model.eftnet import EFTNet
    from tests.test_eftnet import build_msanet, empty_masks, make_episode, make_settings, run

    ep = make_episode(1, 1)
    model = build_msanet(1, ep)
    for settings, episode in ((make_settings(rounds=4, base_lr=0.0002), ep), (make_settings(rounds=4), empty_masks(ep)),
                              (make_settings(rounds=4), ep)):
        result = run(EFTNet(model, settings), episode)
        assert len(result.round_scores) == 4 and [r.score for r in result.rounds] == result.round_scores
        assert best_round(result.round_scores) == result.chosen_round
        assert torch.equal(result.rounds[result.chosen_round - 1].final, result.final)


def test_rules_on_a_pseudo_run_equal_runs_with_that_rule_forced():
    """One label-free run, with the evaluator's ground-truth observer, gives the reference's
    selection (s2q with the query's ground truth) exactly: same scores, same round, same answer
    as a separate ``s2q_query_mask: ground_truth`` run, whose rounds are the same predictions
    (the trajectory does not depend on the selection)."""
    torch = pytest.importorskip("torch")
    from model.eftnet import EFTNet
    from tests.test_eftnet import build_msanet, make_settings, make_episode, run
    from evaluation.analysis import GroundTruthScores

    ep = make_episode(1, 1)
    model = build_msanet(1, ep)
    observer = GroundTruthScores(ep.query_mask)
    pseudo = run(EFTNet(model, make_settings(rounds=3)), ep, observer=observer)
    reference = run(EFTNet(model, make_settings(rounds=3, query_mask_source="ground_truth")), ep, query_mask=ep.query_mask)
    assert observer.scores == pytest.approx(reference.round_scores, abs=1e-6)
    assert best_round(observer.scores) == reference.chosen_round
    chosen = pseudo.rounds[best_round(observer.scores) - 1]
    assert torch.allclose(chosen.final, reference.final, atol=1e-5)
    for ours, theirs in zip(pseudo.rounds, reference.rounds):  # one trajectory, whatever the selection
        assert torch.allclose(ours.final, theirs.final, atol=1e-5)


def test_ground_truth_run_has_only_the_reference_rule():
    e = EpisodeRounds(counts(10, 100), [counts(20, 100), counts(30, 100)], None, [0.4, 0.3])
    selected = select_all([e], 2, with_gt_scores=True, with_label_free_scores=False)
    assert "s2q" not in selected and selected["s2q_gt"].chosen.tolist() == [1]
    with pytest.raises(ValueError, match="label-free"):
        choose(rule_set(2, False)[1], e)


@pytest.mark.parametrize("scores, chosen", [
    ([0.5, 0.7, 0.6, 0.9], 2),     # stops at the first fall, although round 4 scores best
    ([0.5, 0.5, 0.3], 2),          # an equal score goes on
    ([0.4, 0.3, 0.8], 1),
    ([0.1, 0.2, 0.3], 3),          # never falls: the last round
    ([math.nan, 0.2], 0),          # as best_round: round 1 needs a number >= 0 ...
    ([0.3, math.nan, 0.9], 1),     # ... and a NaN is a fall
])
def test_s2q_stop_takes_the_last_round_before_the_score_falls(scores, chosen):
    from model.round_selection import first_peak

    assert first_peak(scores) == chosen


def test_vote_rules_are_scored_on_their_recorded_counts():
    """A vote rule's answer is no round: its counts come from the record, its histogram is empty."""
    votes = [{"soft_vote": counts(60, 100), "s2q_vote": counts(55, 100), "stop_vote": counts(50, 100)},
             {"soft_vote": counts(10, 100), "s2q_vote": counts(12, 100), "stop_vote": counts(11, 100)}]
    episodes = [EpisodeRounds(counts(10, 100), [counts(20, 100), counts(30, 100)], [0.5, 0.4], votes=v) for v in votes]
    selected = select_all(episodes, 2, with_gt_scores=False)
    assert [c.tolist() for c in selected["soft_vote"].counts] == [counts(60, 100), counts(10, 100)]
    assert [c.tolist() for c in selected["s2q_vote"].counts] == [counts(55, 100), counts(12, 100)]
    assert selected["soft_vote"].histogram(2) == [0, 0, 0]
    without = select_all([EpisodeRounds(counts(10, 100), [counts(20, 100)], [0.5])], 1, with_gt_scores=False)
    assert "soft_vote" not in without and "s2q_stop" in without  # no recorded votes, no vote rule
