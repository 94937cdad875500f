"""Round-selection rules, all applied to the same fine-tuning trajectory of each episode.

EFTNet's trajectory (pseudo labels, SGD steps) does not depend on which round is finally
returned: a round's prediction and score come from the weights before its step. So once every
round's query counts and s2q scores are recorded, each selection rule is a pure function of the
record, and one run reports all of them on identical episodes.

Round numbering is the engine's: 0 is the zero round (the base model), 1..N the fine-tuning
rounds. The label-free rules are the engine's own functions (model/round_selection.py), applied
to the recorded scores; a vote rule's answer is not a round, so the evaluator records its
counts. Counts are ``[[inter_bg, inter_fg], [union_bg, union_fg], [target_bg, target_fg]]``
against the query label at original resolution (``evaluation.records.episode_record``'s layout).

An episode that stopped early (a non-finite loss ended its rounds after R < N rounds) has R
rounds: ``last`` is its round R, and a fixed round r > R takes its round R too, the prediction
the engine would have returned had it been forced to stop there.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Mapping, Optional, Sequence

import numpy as np

from model.round_selection import DESCRIPTIONS, ROUND_RULES, S2Q, S2Q_STOP, VOTE_RULES, best_round

ZERO, S2Q_GT, LAST, ORACLE = "zero", "s2q_gt", "last", "oracle"
NO_ROUND = -1  # a vote rule's "chosen round": its answer combines the rounds


@dataclass(frozen=True)
class Rule:
    """A selection rule. ``reads_labels``: the choice itself looks at the query's ground truth,
    so its number is not an achievable label-free result. ``vote``: the answer is the engine's
    combination of the rounds (model/round_selection.py), recorded as counts of its own."""

    name: str
    reads_labels: bool
    description: str
    round: Optional[int] = None  # the fixed round of a ``round_r`` rule
    vote: bool = False


def fixed_round_name(r: int) -> str:
    return f"round_{r}"


def rule_set(num_rounds: int, with_gt_scores: bool, with_label_free_scores: bool = True,
             with_votes: bool = False) -> list[Rule]:
    """The rules reported for ``num_rounds`` rounds, in table order; ``s2q``, its label-free
    variants and ``s2q_gt`` only when their scores were recorded (a ``s2q_query_mask:
    ground_truth`` run has only the latter), the vote rules when their counts were."""
    if num_rounds < 1:
        raise ValueError(f"num_rounds must be >= 1, got {num_rounds}")
    rules = [Rule(ZERO, False, "zero round: the base model, no fine-tuning")]
    if with_label_free_scores:
        rules.append(Rule(S2Q, False, "EFTNet: best s2q score with the query's pseudo label (label-free)"))
        rules.append(Rule(S2Q_STOP, False, DESCRIPTIONS[S2Q_STOP]))
        if with_votes:
            rules += [Rule(name, False, DESCRIPTIONS[name], vote=True) for name in VOTE_RULES]
    if with_gt_scores:
        rules.append(Rule(S2Q_GT, True, "EFTNet as the reference: best s2q score with the query's ground truth"))
    rules.append(Rule(LAST, False, f"last round (round {num_rounds}): no discrimination"))
    rules += [Rule(fixed_round_name(r), False, f"fixed round {r}", r) for r in range(1, num_rounds + 1)]
    rules.append(Rule(ORACLE, True, "oracle: the round with the best query foreground IoU (an upper bound)"))
    return rules


@dataclass
class EpisodeRounds:
    """What one episode's record holds about its rounds.

    ``zero`` [3, 2] and ``rounds`` [R, 3, 2]: counts of the zero round and of each round's query
    prediction; ``scores`` [R] or None: the label-free s2q scores; ``gt_scores`` [R] or None: the
    s2q scores with the query's ground truth in place of its pseudo label; ``votes``: the counts
    of each vote rule's prediction, by rule (None when not recorded).
    """

    zero: np.ndarray
    rounds: np.ndarray
    scores: Optional[Sequence[float]]
    gt_scores: Optional[Sequence[float]] = None
    votes: Optional[Mapping[str, np.ndarray]] = None

    def __post_init__(self) -> None:
        self.zero = np.asarray(self.zero, dtype=np.int64).reshape(3, 2)
        self.rounds = np.asarray(self.rounds, dtype=np.int64).reshape(-1, 3, 2)
        if self.rounds.shape[0] < 1:
            raise ValueError("an episode must have at least one round")
        if self.scores is not None and len(self.scores) != self.rounds.shape[0]:
            raise ValueError(f"{len(self.scores)} s2q scores for {self.rounds.shape[0]} rounds")
        if self.gt_scores is not None and len(self.gt_scores) != self.rounds.shape[0]:
            raise ValueError(f"{len(self.gt_scores)} ground-truth s2q scores for {self.rounds.shape[0]} rounds")

    @property
    def num_rounds(self) -> int:
        return int(self.rounds.shape[0])

    def counts(self, round_index: int) -> np.ndarray:
        """Counts of round ``round_index`` (0: the zero round)."""
        return self.zero if round_index == 0 else self.rounds[round_index - 1]


def _fg_iou(counts: np.ndarray) -> Fraction:
    """Exact foreground IoU (0 where the union is empty), so equal ratios compare equal."""
    inter, union = int(counts[0, 1]), int(counts[1, 1])
    return Fraction(inter, union) if union else Fraction(0)


def oracle_choice(rounds: np.ndarray) -> int:
    """The fine-tuning round (1..R; the zero round is not a candidate, as for s2q) with the best
    query foreground IoU. Ties go to the later round, as in the s2q rule."""
    best, chosen = Fraction(-1), 0
    for index, counts in enumerate(rounds, start=1):
        iou = _fg_iou(counts)
        if iou >= best:
            best, chosen = iou, index
    return chosen


def choose(rule: Rule, episode: EpisodeRounds) -> int:
    """The round (0..R) that ``rule`` returns for ``episode``."""
    if rule.name == ZERO:
        return 0
    if rule.name in ROUND_RULES:
        if episode.scores is None:
            raise ValueError(f"rule {rule.name} needs the label-free s2q scores, which this episode lacks")
        return ROUND_RULES[rule.name](episode.scores)
    if rule.name == S2Q_GT:
        if episode.gt_scores is None:
            raise ValueError("rule s2q_gt needs the ground-truth s2q scores, which this episode lacks")
        return best_round(episode.gt_scores)
    if rule.vote:
        return NO_ROUND
    if rule.name == LAST:
        return episode.num_rounds
    if rule.name == ORACLE:
        return oracle_choice(episode.rounds)
    if rule.round is not None:
        return min(rule.round, episode.num_rounds)  # an early stop keeps its last round
    raise ValueError(f"unknown selection rule {rule.name!r}")


@dataclass
class Selection:
    """One rule over a list of episodes: the chosen round [E] and its counts [E, 3, 2]."""

    rule: Rule
    chosen: np.ndarray
    counts: np.ndarray

    def histogram(self, num_rounds: int) -> list[int]:
        """How often each round 0..num_rounds was chosen (all zero for a vote rule)."""
        return np.bincount(self.chosen[self.chosen != NO_ROUND], minlength=num_rounds + 1)[:num_rounds + 1].tolist()


def select_all(episodes: Sequence[EpisodeRounds], num_rounds: int,
               with_gt_scores: bool, with_label_free_scores: bool = True) -> dict[str, Selection]:
    """Every rule of ``rule_set`` applied to every episode, by rule name in table order (the vote
    rules when every episode recorded them)."""
    with_votes = all(e.votes is not None for e in episodes)
    out = {}
    for rule in rule_set(num_rounds, with_gt_scores, with_label_free_scores, with_votes):
        chosen = np.array([choose(rule, e) for e in episodes], dtype=np.int64)
        counts = np.array([e.votes[rule.name] if rule.vote else e.counts(c) for e, c in zip(episodes, chosen)],
                          dtype=np.int64).reshape(-1, 3, 2)
        out[rule.name] = Selection(rule, chosen, counts)
    return out


def round_counts(episodes: Sequence[EpisodeRounds], num_rounds: int) -> np.ndarray:
    """[E, num_rounds + 1, 3, 2]: each episode's counts for rounds 0..num_rounds, an early-stopped
    episode's last round standing in for the rounds it did not reach (as for fixed rounds)."""
    return np.array([[e.counts(min(r, e.num_rounds)) for r in range(num_rounds + 1)] for e in episodes],
                    dtype=np.int64).reshape(-1, num_rounds + 1, 3, 2)
