"""EFTNet: meta-test-time fine-tuning of a few-shot segmenter's meta learner, per episode.

For every episode: save the adapted head parameters, predict once with the base model
(the zero round), then run ``ft_number`` rounds. Each round scores the current weights by
support-to-query (s2q) re-segmentation of the supports, predicts the query by
query-to-support (q2s) guidance (real supports blended with the query under its most
confident pseudo mask), and takes one SGD step towards the previous round's prediction.
The round with the best s2q score is the answer (``round_selection``: the paper's rule by
default, model/round_selection.py has the others); then the parameters are restored.

Reference behaviour kept on purpose (docs/reference_behaviour.md, section 2):
- a round's score and prediction come from the weights *before* its step, so the last
  step is never used (and is skipped here);
- round 1 is always accepted (scores start at 0, compared with ``>=``) and ties go to the
  later round, so the zero round itself is never returned;
- the q2s pseudo mask keeps the top ``q2s_filt_para`` fraction of the predicted foreground,
  and with too few foreground pixels for even one (fewer than 5 at 0.2) it covers the whole
  canvas, padding included;
- everything runs in eval mode (dropout off, BatchNorm on running statistics).
The one deliberate difference: by default (``s2q_query_mask: pseudo``) the query takes
its pseudo label when it stands in as a support in s2q; the reference reads the query's
ground truth there, which ``s2q_query_mask: ground_truth`` reproduces.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor

from model.base import Blendable, FewShotModel, Prediction, ShotTable
from model.contract import IGNORE, check_adapt_inputs
from model.round_selection import RULES, ROUND_RULES, S2Q, VOTE_RULES
from model.similarity import CacheBudget

IOU_EPS = 1e-10
ROUND_LR_EPS = 1e-10  # the reference adds it to every round's learning rate
CONFIDENCE_EPS = 1e-10  # the reference's margin on the q2s confidence threshold
DEFAULT_CACHE_MB = 1024


@dataclass
class Round:
    """One fine-tuning round: its q2s query prediction (weights before its step), the query's
    q2s support mask and the round's s2q score."""

    final: Tensor
    meta: Tensor
    q2s_mask: Tensor
    score: float


@dataclass
class RoundProbe:
    """What an observer may ask of a round before its step: its number (1-based), and its s2q
    score under another query mask [1,S,S] (0/1/255), e.g. the evaluator's ground truth."""

    index: int
    s2q_score: Callable[[Tensor], float]


@dataclass
class AdaptResult:
    """Outputs of the chosen round, plus what happened on the way."""

    final: Tensor
    meta: Tensor
    base: Tensor
    zero_round: Prediction
    round_scores: list[float]
    chosen_round: Optional[int]              # 1..N; None when the answer combines rounds (a vote rule)
    losses: list[float] = field(default_factory=list)
    pseudo_mask: Optional[Tensor] = None     # round 1's q2s support mask of the query
    stopped_early: bool = False              # a non-finite loss ended the rounds
    rounds: list[Round] = field(default_factory=list)
    votes: dict[str, Tensor] = field(default_factory=dict)  # every vote rule's final prediction
    selection: str = S2Q                     # the round_selection rule that gave final / meta / base


def round_learning_rate(base_lr: float, rounds: int, index: int, power: float) -> float:
    """The reference's poly schedule over N rounds (divisor N + 1, so it never reaches 0)."""
    return base_lr * (1 - index / (rounds + 1)) ** power + ROUND_LR_EPS


def pseudo_label(final: Tensor, padding: Optional[Tensor]) -> Tensor:
    """Argmax of a prediction [B,2,S,S] with the padded canvas ignored -> [B,S,S] int64."""
    label = final.argmax(1)
    if padding is not None:
        label = label.masked_fill(padding, IGNORE)
    return label


def confident_foreground(prob: Tensor, fraction: float) -> Tensor:
    """The q2s support mask: the top ``fraction`` of the predicted foreground (``prob`` > 0.5,
    [B,S,S], ``FewShotModel.foreground_probability``), by confidence.

    With fewer foreground pixels than 1 / fraction the reference's index is 0 and its
    threshold becomes the smallest value of the zero-filled map, so every pixel is kept.
    """
    filtered = torch.where(prob > 0.5, prob, torch.zeros_like(prob)).flatten()
    keep = int(int((filtered > 0).sum()) * fraction)
    threshold = filtered.kthvalue(filtered.numel() - keep + 1).values if keep > 0 else filtered.min()
    return (prob >= threshold + CONFIDENCE_EPS).float()


def foreground_iou(final: Tensor, mask: Tensor) -> Tensor:
    """Per-item IoU of predicted foreground with ``mask == 1`` (255 counts as background)."""
    pred = final.argmax(1) == 1
    label = mask == 1
    inter = (pred & label).flatten(1).sum(1).float()
    union = (pred | label).flatten(1).sum(1).float()
    return inter / (union + IOU_EPS)


@dataclass(frozen=True)
class EFTNetSettings:
    """EFTNet's hyper-parameters; the defaults are the reference's PASCAL values. The config
    key of each field is in brackets (``from_config``)."""

    rounds: int = 5                                   # [ft_number] fine-tuning rounds
    base_lr: float = 0.005                            # [ft_base_lr] poly schedule over the rounds
    power: float = 0.9                                # [ft_power]
    momentum: float = 0.9                             # [momentum] SGD
    weight_decay: float = 1e-4                        # [weight_decay] SGD
    aux_weight: float = 1.0                           # [sr_aux_weight1] weight of the meta output's loss
    blend: tuple[float, float] = (0.8, 0.2)           # [change_weighting] real supports, same image
    q2s_fraction: float = 0.2                         # [q2s_filt_para] confident foreground kept
    query_mask_source: str = "pseudo"                 # [s2q_query_mask] pseudo or ground_truth
    q2s_blend: bool = True                            # [q2s_blend] False: the q2s ablation
    # [similarity_cache_mb] similarity products kept across rounds (same outputs; past it they
    # are recomputed; 0: every round matches directly)
    similarity_cache_mb: float = DEFAULT_CACHE_MB
    round_selection: str = S2Q                        # [round_selection] model/round_selection.py

    KEYS = {"rounds": "ft_number", "base_lr": "ft_base_lr", "power": "ft_power", "momentum": "momentum",
            "weight_decay": "weight_decay", "aux_weight": "sr_aux_weight1", "blend": "change_weighting",
            "q2s_fraction": "q2s_filt_para", "query_mask_source": "s2q_query_mask", "q2s_blend": "q2s_blend",
            "similarity_cache_mb": "similarity_cache_mb", "round_selection": "round_selection"}

    def __post_init__(self):
        if self.rounds < 1:
            raise ValueError(f"ft_number must be >= 1 for EFTNet, got {self.rounds}")
        if self.query_mask_source not in ("pseudo", "ground_truth"):
            raise ValueError(f"s2q_query_mask must be 'pseudo' or 'ground_truth', got {self.query_mask_source!r}")
        if len(self.blend) != 2:
            raise ValueError(f"change_weighting must be two numbers [real, same-image], got {self.blend!r}")
        if self.round_selection not in RULES:
            raise ValueError(f"round_selection must be one of {RULES}, got {self.round_selection!r}")

    @classmethod
    def from_config(cls, cfg: Any) -> "EFTNetSettings":
        """The settings of a loaded config (attribute access by the config key names)."""
        values = {name: getattr(cfg, key) for name, key in cls.KEYS.items()}
        return cls(rounds=int(values["rounds"]), base_lr=float(values["base_lr"]), power=float(values["power"]),
                   momentum=float(values["momentum"]), weight_decay=float(values["weight_decay"]),
                   aux_weight=float(values["aux_weight"]), blend=tuple(float(w) for w in values["blend"]),
                   q2s_fraction=float(values["q2s_fraction"]), query_mask_source=values["query_mask_source"],
                   q2s_blend=bool(values["q2s_blend"]), similarity_cache_mb=float(values["similarity_cache_mb"]),
                   round_selection=values["round_selection"])


class EFTNet:
    """Fine-tunes ``base_model``'s meta learner on each episode's query; adds no parameters.
    ``settings``: an :class:`EFTNetSettings`, or a loaded config (read by ``from_config``)."""

    def __init__(self, base_model: FewShotModel, settings: Any):
        self.model = base_model
        self.settings = settings if isinstance(settings, EFTNetSettings) else EFTNetSettings.from_config(settings)
        self.groups = [list(m.parameters()) for m in base_model.adapted_modules()]
        self.params = [p for group in self.groups for p in group]

    # ---- the episode loop ----------------------------------------------------------------
    def adapt(self, query_img: Tensor, support_imgs: Tensor, support_masks: Tensor,
              padding: Optional[Tensor] = None, query_mask: Optional[Tensor] = None,
              observer: Optional[Callable[[RoundProbe], None]] = None) -> AdaptResult:
        """Adapt on one episode (batch size 1, as in the reference); weights are restored after.

        ``observer`` (evaluation only) is called once per round, before its step, with a
        :class:`RoundProbe`; what it asks does not change the rounds."""
        check_adapt_inputs(self.model, query_img, support_imgs, support_masks, padding, query_mask)
        if query_img.shape[0] != 1:
            raise ValueError(f"EFTNet adapts one episode at a time (batch size 1), got a batch of {query_img.shape[0]}")
        if self.settings.query_mask_source == "ground_truth" and query_mask is None:
            raise ValueError("s2q_query_mask is 'ground_truth' but no query_mask was given")
        with self._episode():
            return self._adapt_episode(query_img, support_imgs[0], support_masks, padding, query_mask, observer)

    @contextmanager
    def _episode(self) -> Iterator[None]:
        """Eval mode, gradients for the adapted parameters only, and their values restored."""
        model = self.model
        was_training = model.training
        requires = {p: p.requires_grad for p in model.parameters()}
        saved = [p.detach().clone() for p in self.params]
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        for p in self.params:
            p.requires_grad_(True)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, value in zip(self.params, saved):
                    p.copy_(value)
                    p.grad = None
            for p, flag in requires.items():
                p.requires_grad_(flag)
            model.train(was_training)

    def _prepare(self, query_img: Tensor, support_imgs: Tensor, support_masks: Tensor) -> tuple["_State", Prediction]:
        """Everything fixed within the episode, and the zero round (the plain base model)."""
        model = self.model
        query, supports = model.extract(query_img), model.extract(support_imgs)
        cache_bytes = int(self.settings.similarity_cache_mb * 2**20)
        budget = CacheBudget(cache_bytes) if cache_bytes > 0 else None   # None: match directly
        with torch.no_grad():  # parameter-free statistics of the fixed support masks: once per episode
            real = model.match(query, supports, support_masks)
            pairs = model.support_table(supports, support_masks, budget)
            zero = model.decode(query, model.guide(real, model.embed(supports)[None]))
        # Only the query's masks change between rounds: as a support of itself (q2s) and of each support (s2q).
        state = _State(query, supports, support_masks, real, pairs,
                       model.matcher(query, query, budget), model.matcher(supports, query, budget))
        return state, zero

    def _adapt_episode(self, query_img: Tensor, support_imgs: Tensor, support_masks: Tensor,
                       padding: Optional[Tensor], query_mask: Optional[Tensor],
                       observer: Optional[Callable[[RoundProbe], None]]) -> AdaptResult:
        model, s = self.model, self.settings
        state, zero = self._prepare(query_img, support_imgs, support_masks)
        optimizer = torch.optim.SGD([{"params": g} for g in self.groups], lr=s.base_lr,
                                    momentum=s.momentum, weight_decay=s.weight_decay)
        previous, bases = zero, []
        losses, rounds, stopped = [], [], False
        for index in range(s.rounds):
            for group in optimizer.param_groups:
                group["lr"] = round_learning_rate(s.base_lr, s.rounds, index, s.power)
            label = pseudo_label(previous.final, padding)
            steps = index < s.rounds - 1  # the last step's weights would never be scored
            with torch.set_grad_enabled(steps):
                embeds = model.embed(state.supports), model.embed(state.query)
                score = self._s2q_score(state, query_mask if s.query_mask_source == "ground_truth" else label, *embeds)
                mask = confident_foreground(model.foreground_probability(previous), s.q2s_fraction)
                prediction = self._q2s(state, mask, *embeds)
            rounds.append(Round(prediction.final.detach(), prediction.meta.detach(), mask, score))
            bases.append(prediction.base)
            if observer is not None:
                observer(RoundProbe(index + 1, lambda m, e=embeds: self._s2q_score(state, m, *e)))
            if steps:
                loss = model.adaptation_loss(prediction, label, s.aux_weight)
                losses.append(float(loss.detach()))
                if not math.isfinite(losses[-1]):
                    stopped = True
                    break
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            previous = Prediction(prediction.final.detach(), prediction.meta.detach())
        scores = [r.score for r in rounds]
        votes = {name: rule([r.final for r in rounds], scores) for name, rule in VOTE_RULES.items()}
        if s.round_selection in VOTE_RULES:
            chosen = None
            final = votes[s.round_selection]
            meta = VOTE_RULES[s.round_selection]([r.meta for r in rounds], scores)
            base = bases[0]  # the base learner is frozen: the same in every round
        else:
            chosen = ROUND_RULES[s.round_selection](scores)
            if chosen == 0:
                final, meta, base = zero.final, zero.meta, zero.base
            else:
                final, meta, base = rounds[chosen - 1].final, rounds[chosen - 1].meta, bases[chosen - 1]
        return AdaptResult(final.detach(), meta.detach(), base, zero, scores, chosen,
                           losses, rounds[0].q2s_mask, stopped, rounds, votes, s.round_selection)

    # ---- the two branches ----------------------------------------------------------------
    def _q2s(self, state: "_State", mask: Tensor, support_embed: Tensor, query_embed: Tensor) -> Prediction:
        """Query prediction from the real supports blended with the query under its pseudo mask
        ``mask``; with ``q2s_blend`` off (an ablation), from the real supports only."""
        model = self.model
        guidance = model.guide(state.real, support_embed[None])
        if self.settings.q2s_blend:
            with torch.no_grad():
                same = state.q2s_match(mask[:, None])
            guidance = guidance.blend(model.guide(same, query_embed[None]), self.settings.blend)
        return model.decode(state.query, guidance)

    @torch.no_grad()
    def _s2q_score(self, state: "_State", query_mask: Tensor, support_embed: Tensor, query_embed: Tensor) -> float:
        """Mean IoU of re-segmenting each support k, with the query (under ``query_mask``) in
        place of support k and support k itself (under its own mask) as the blended same-image
        support. All K supports are segmented in one batch."""
        model = self.model
        k = state.supports.batch
        different = state.pairs.replace_diagonal(state.s2q_match(query_mask[:, None]))     # [K, K]
        eye = torch.eye(k, dtype=torch.bool, device=support_embed.device)
        eye = eye.view(k, k, *[1] * (support_embed.dim() - 1))
        different_embed = torch.where(eye, query_embed[None], support_embed[None].expand(k, *support_embed.shape))
        guidance: Blendable = model.guide(different, different_embed).blend(
            model.guide(state.pairs.diagonal(), support_embed[:, None]), self.settings.blend)
        prediction = model.decode(state.supports, guidance)
        return float(foreground_iou(prediction.final, state.support_masks[0]).mean())


@dataclass
class _State:
    """What stays fixed within an episode: features, the support statistics, the matchers."""

    query: Any                            # the model's features (``extract``)
    supports: Any
    support_masks: Tensor
    real: ShotTable                       # the query against the real supports
    pairs: ShotTable                      # each support against all supports [K, K] (``support_table``)
    q2s_match: Callable[[Tensor], ShotTable]   # the query against itself under a mask
    s2q_match: Callable[[Tensor], ShotTable]   # each support against the query under a mask
