"""Label-free round selection: which answer EFTNet gives once its rounds have run.

Every rule here sees only what the engine has without the query's label: the rounds' s2q
scores and their query predictions. Two kinds:

- a *round* rule picks one fine-tuning round (1..N) from the scores; the answer is that round's
  prediction. The evaluation applies the same functions to recorded scores, so its rules table
  and the engine agree by construction.
- a *vote* rule combines the rounds' predictions into a new one: the mean of their class
  probabilities, uniform, weighted by the s2q scores, or over the rounds before the score
  falls. The engine computes every vote rule's prediction in each episode (a few additions)
  and the evaluation records it like a round's.

``s2q`` is the paper's rule and the default.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

S2Q = "s2q"                  # the paper's: the best s2q score, ties to the later round
S2Q_STOP = "s2q_stop"        # the paper's score, read in order: stop at the first round whose score falls
SOFT_VOTE = "soft_vote"      # mean of all rounds' probabilities
S2Q_VOTE = "s2q_vote"        # mean of all rounds' probabilities, each weighted by its s2q score
STOP_VOTE = "stop_vote"      # mean of the probabilities of the rounds s2q_stop reads (up to its answer)


def best_round(scores: Sequence[float]) -> int:
    """The paper's discrimination (1-based): the best score starts at 0 and a round is taken
    when its score is ``>=`` the best so far. Round 1 is always taken (scores are IoUs >= 0) and
    ties go to the later round; 0 (the zero round) comes back only when no score is a number
    >= 0 (NaN scores)."""
    best, chosen = 0.0, 0
    for index, score in enumerate(scores, start=1):
        if score >= best:
            best, chosen = score, index
    return chosen


def first_peak(scores: Sequence[float]) -> int:
    """The paper's score with a stop (1-based): rounds are taken in order while the score does
    not fall, and the last one taken is the answer. The rounds after the first drop are never
    considered, on the view that a falling s2q score means the pseudo labels have started to
    pull the weights away. As ``best_round``: round 1 is taken if its score is a number >= 0, and
    an equal score goes on to the later round."""
    chosen = best_round(scores[:1])
    for index in range(1, len(scores)):
        if not scores[index] >= scores[index - 1]:
            break
        chosen = index + 1
    return chosen


def vote(logits: Sequence[Tensor], weights: Sequence[float] | None = None) -> Tensor:
    """The rounds' predictions [1,C,S,S] combined: the (weighted) mean of their softmax
    probabilities, returned as log-probabilities so that it reads like logits (argmax, softmax).
    Weights that are all 0 (or not numbers) count every round alike."""
    probabilities = torch.stack([l.softmax(1) for l in logits])
    if weights is None or not sum(w for w in weights if w == w) > 0:
        mean = probabilities.mean(0)
    else:
        w = torch.tensor([w if w == w else 0.0 for w in weights], dtype=probabilities.dtype,
                         device=probabilities.device)
        mean = (probabilities * (w / w.sum()).view(-1, 1, 1, 1, 1)).sum(0)
    return mean.clamp_min(torch.finfo(mean.dtype).tiny).log()


ROUND_RULES: dict[str, Callable[[Sequence[float]], int]] = {S2Q: best_round, S2Q_STOP: first_peak}
VOTE_RULES: dict[str, Callable[[Sequence[Tensor], Sequence[float]], Tensor]] = {
    SOFT_VOTE: lambda logits, scores: vote(logits),
    S2Q_VOTE: lambda logits, scores: vote(logits, scores),
    STOP_VOTE: lambda logits, scores: vote(logits[:max(first_peak(scores), 1)]),
}
RULES = (*ROUND_RULES, *VOTE_RULES)
DESCRIPTIONS = {
    S2Q: "EFTNet: the best s2q score (the paper's rule)",
    S2Q_STOP: "s2q with a stop: the last round before the s2q score first falls",
    SOFT_VOTE: "soft vote: the mean of every round's probabilities",
    S2Q_VOTE: "s2q vote: the mean of every round's probabilities, weighted by its s2q score",
    STOP_VOTE: "stop vote: the mean of the probabilities of rounds 1 to s2q_stop's answer",
}
