"""Paired bootstrap confidence intervals for the difference between two methods on the same episodes.

Few-shot numbers are class means of ratios of pixel sums, so the usual per-episode mean and
standard error do not apply, and 1,000 episodes leave a seed-to-seed spread of about a point.
The honest question is "is method A better than the zero round Z *on these episodes*?":
resample the episodes with replacement, the same draw for both methods (so the episode-to-episode
difficulty cancels), recompute each method's class mIoU and FB-IoU from the summed counts exactly
as ``evaluation.metrics.FewShotMeter`` does, and take the percentile interval of the difference A - Z.

Everything is vectorised: a draw is a row of a [draws, episodes] matrix of how often each episode
was picked, and a block of rows times the per-episode count columns gives every draw's sums in one
matrix product (counts are integers far below 2**53, so the float64 sums are exact).

Draws are reproducible: stratum ``g`` (a seed of a pooled run, or a fold) with ``E`` episodes takes
``numpy.random.default_rng([seed, g]).integers(0, E, size=(draws, E))`` as its resampled indices,
generated in blocks of rows, which numpy guarantees gives the same numbers as one call.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal, Sequence

import numpy as np

from evaluation.metrics import EPS

DEFAULT_DRAWS = 2000
DEFAULT_SEED = 2024
DEFAULT_LEVEL = 0.95
BLOCK_BYTES = 32 * 2**20  # bound on one block's [draws, episodes] float64 weight matrix


@dataclass(frozen=True)
class EpisodeCounts:
    """One method's bg/fg pixel counts on a set of episodes, with each episode's class.

    ``class_idx`` [E] is 0..num_classes-1 within the fold; ``inter`` and ``union`` are [E, 2]
    (background, foreground), as ``FewShotMeter.add`` receives them.
    """

    class_idx: np.ndarray
    inter: np.ndarray
    union: np.ndarray
    num_classes: int

    def __post_init__(self) -> None:
        class_idx = np.asarray(self.class_idx, dtype=np.int64).reshape(-1)
        inter = np.asarray(self.inter, dtype=np.int64)
        union = np.asarray(self.union, dtype=np.int64)
        episodes = class_idx.shape[0]
        if inter.shape != (episodes, 2) or union.shape != (episodes, 2):
            raise ValueError(f"inter and union must be [{episodes}, 2] (bg, fg) for {episodes} episodes, "
                             f"got {inter.shape} and {union.shape}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if episodes and (class_idx.min() < 0 or class_idx.max() >= self.num_classes):
            raise ValueError(f"class_idx outside 0..{self.num_classes - 1}")
        if (inter < 0).any() or (inter > union).any():
            raise ValueError("counts must satisfy 0 <= intersection <= union")
        # Frozen dataclass: store the normalised arrays through object.__setattr__.
        object.__setattr__(self, "class_idx", class_idx)
        object.__setattr__(self, "inter", inter)
        object.__setattr__(self, "union", union)

    @classmethod
    def from_counts(cls, class_idx: Sequence[int], counts: Sequence, num_classes: int) -> "EpisodeCounts":
        """From per-episode record counts ``[[inter_bg, inter_fg], [union_bg, union_fg], [target_bg,
        target_fg]]`` (``evaluation.records.episode_record``'s layout), or an array [E, 3, 2]."""
        array = np.asarray(counts, dtype=np.int64).reshape(-1, 3, 2)
        return cls(np.asarray(class_idx), array[:, 0], array[:, 1], num_classes)

    def __len__(self) -> int:
        return int(self.class_idx.shape[0])

    def fg_iou(self) -> np.ndarray:
        """Per-episode foreground IoU [E] (0 where the union is empty), with the meters' guard."""
        return self.inter[:, 1] / (self.union[:, 1] + EPS)

    def class_miou(self) -> float:
        return float(_metrics(_columns(self).sum(0, keepdims=True), self.num_classes)[0][0])

    def fb_iou(self) -> float:
        return float(_metrics(_columns(self).sum(0, keepdims=True), self.num_classes)[1][0])


@dataclass(frozen=True)
class Interval:
    """A point estimate on the full sample and its percentile bootstrap interval."""

    point: float
    low: float
    high: float


@dataclass(frozen=True)
class PairedComparison:
    """Method A against method Z on the same episodes: differences A - Z with intervals."""

    miou: Interval           # class mIoU difference
    fbiou: Interval          # FB-IoU difference
    miou_a: float
    miou_z: float
    fbiou_a: float
    fbiou_z: float
    improved: float          # share of episodes whose foreground IoU A > Z
    worsened: float          # ... A < Z
    unchanged: float         # ... A == Z (exactly, compared as fractions of integer counts)
    episodes: int
    draws: int
    seed: int
    level: float

    def to_dict(self) -> dict:
        return asdict(self)


def _columns(counts: EpisodeCounts) -> np.ndarray:
    """[E, 2n + 4] float64: fg intersection and union scattered to the episode's class column
    (n each), then pooled bg/fg intersection and bg/fg union. Summed over any multiset of
    episodes they are exactly FewShotMeter's sums."""
    n, episodes = counts.num_classes, len(counts)
    out = np.zeros((episodes, 2 * n + 4))
    rows = np.arange(episodes)
    out[rows, counts.class_idx] = counts.inter[:, 1]
    out[rows, n + counts.class_idx] = counts.union[:, 1]
    out[:, 2 * n:2 * n + 2] = counts.inter
    out[:, 2 * n + 2:] = counts.union
    return out


def _metrics(sums: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(class mIoU, FB-IoU) per row of summed columns. A class with no episode in the row has
    zero sums and so IoU 0, and still counts in the mean, as FewShotMeter (and the reference)."""
    class_iou = sums[:, :n] / (sums[:, n:2 * n] + EPS)
    pooled = sums[:, 2 * n:2 * n + 2] / (sums[:, 2 * n + 2:] + EPS)
    return class_iou.mean(1), pooled.mean(1)


def _compare_fg(a: EpisodeCounts, z: EpisodeCounts) -> np.ndarray:
    """Sign of fg IoU(A) - fg IoU(Z) per episode, exact: i_a / u_a vs i_z / u_z compared by cross
    multiplication of integers, so equal ratios (e.g. 1/2 and 2/4) count as unchanged."""
    def fraction(c: EpisodeCounts) -> tuple[np.ndarray, np.ndarray]:
        empty = c.union[:, 1] == 0  # IoU 0, as the meters' guard makes it
        return np.where(empty, 0, c.inter[:, 1]), np.where(empty, 1, c.union[:, 1])
    (ia, ua), (iz, uz) = fraction(a), fraction(z)
    return np.sign(ia * uz - iz * ua)


def _check_pair(a: EpisodeCounts, z: EpisodeCounts) -> None:
    if len(a) == 0:
        raise ValueError("no episodes to compare")
    if a.num_classes != z.num_classes or len(a) != len(z) or not np.array_equal(a.class_idx, z.class_idx):
        raise ValueError("the two methods must be measured on the same episodes (same classes, same order)")


def _block_rows(episodes: int) -> int:
    return max(1, min(1000, BLOCK_BYTES // (8 * episodes)))


def _weights(rng: np.random.Generator, rows: int, episodes: int) -> np.ndarray:
    """[rows, episodes] float64: how often each episode is picked in each of ``rows`` draws."""
    picks = rng.integers(0, episodes, size=(rows, episodes))
    flat = picks + episodes * np.arange(rows)[:, None]
    return np.bincount(flat.ravel(), minlength=rows * episodes).reshape(rows, episodes).astype(np.float64)


def paired_bootstrap_strata(pairs: Sequence[tuple[EpisodeCounts, EpisodeCounts]],
                            combine: Literal["pool", "mean"], draws: int = DEFAULT_DRAWS,
                            seed: int = DEFAULT_SEED, level: float = DEFAULT_LEVEL) -> PairedComparison:
    """Paired bootstrap over strata of episodes, each resampled within itself.

    ``pairs[g]`` is (A, Z) on stratum g's episodes. ``combine="pool"``: the strata's counts are
    summed into one set of meters (seeds of one fold: same classes), so the statistic is the
    class mIoU of all episodes together. ``combine="mean"``: each stratum's statistic is computed
    on its own and the strata are averaged (folds: each has its own classes; this is the mean
    over folds of the table). The shares of improved / worsened episodes are over all episodes.
    """
    if combine not in ("pool", "mean"):
        raise ValueError(f"combine must be 'pool' or 'mean', got {combine!r}")
    if not pairs:
        raise ValueError("no strata to compare")
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    for a, z in pairs:
        _check_pair(a, z)
    if combine == "pool" and len({a.num_classes for a, _ in pairs}) > 1:
        raise ValueError("strata pooled into one meter must have the same number of classes")

    columns = [np.concatenate([_columns(a), _columns(z)], 1) for a, z in pairs]
    width = [c.shape[1] // 2 for c in columns]
    classes = [a.num_classes for a, _ in pairs]

    def statistics(sums: list[np.ndarray]) -> np.ndarray:
        """[rows, 4]: mIoU A, mIoU Z, FB-IoU A, FB-IoU Z from each stratum's summed columns."""
        if combine == "pool":
            sums = [sum(sums)]
        per_stratum = []
        for s, w, n in zip(sums, width, classes):
            miou_a, fb_a = _metrics(s[:, :w], n)
            miou_z, fb_z = _metrics(s[:, w:], n)
            per_stratum.append(np.stack([miou_a, miou_z, fb_a, fb_z], 1))
        return np.mean(per_stratum, 0)

    point = statistics([c.sum(0, keepdims=True) for c in columns])[0]
    rngs = [np.random.default_rng([seed, g]) for g in range(len(pairs))]
    samples = []
    rows = min(_block_rows(len(a)) for a, _ in pairs)
    for start in range(0, draws, rows):
        block = min(rows, draws - start)
        samples.append(statistics([_weights(rng, block, c.shape[0]) @ c for rng, c in zip(rngs, columns)]))
    samples = np.concatenate(samples, 0)
    tails = [100 * (1 - level) / 2, 100 * (1 + level) / 2]
    miou_low, miou_high = np.percentile(samples[:, 0] - samples[:, 1], tails)
    fb_low, fb_high = np.percentile(samples[:, 2] - samples[:, 3], tails)

    signs = np.concatenate([_compare_fg(a, z) for a, z in pairs])
    episodes = signs.shape[0]
    return PairedComparison(
        miou=Interval(float(point[0] - point[1]), float(miou_low), float(miou_high)),
        fbiou=Interval(float(point[2] - point[3]), float(fb_low), float(fb_high)),
        miou_a=float(point[0]), miou_z=float(point[1]), fbiou_a=float(point[2]), fbiou_z=float(point[3]),
        improved=float((signs > 0).mean()), worsened=float((signs < 0).mean()),
        unchanged=float((signs == 0).mean()), episodes=episodes, draws=draws, seed=seed, level=level)


def paired_bootstrap(a: EpisodeCounts, z: EpisodeCounts, draws: int = DEFAULT_DRAWS,
                     seed: int = DEFAULT_SEED, level: float = DEFAULT_LEVEL) -> PairedComparison:
    """Method A against Z on one set of episodes (one seed of one fold)."""
    return paired_bootstrap_strata([(a, z)], "pool", draws, seed, level)


def pooled_over_seeds(pairs: Sequence[tuple[EpisodeCounts, EpisodeCounts]], draws: int = DEFAULT_DRAWS,
                      seed: int = DEFAULT_SEED, level: float = DEFAULT_LEVEL) -> PairedComparison:
    """The seeds of one fold as one sample (their episodes concatenated, counts summed), each
    seed's episodes resampled within that seed, as the episode lists were drawn per seed."""
    return paired_bootstrap_strata(pairs, "pool", draws, seed, level)


def pooled_over_folds(pairs: Sequence[tuple[EpisodeCounts, EpisodeCounts]], draws: int = DEFAULT_DRAWS,
                      seed: int = DEFAULT_SEED, level: float = DEFAULT_LEVEL) -> PairedComparison:
    """The mean over folds of each fold's difference, each fold resampled on its own (pass a
    fold's seeds already concatenated with ``concat``)."""
    return paired_bootstrap_strata(pairs, "mean", draws, seed, level)


def concat(parts: Sequence[EpisodeCounts]) -> EpisodeCounts:
    """Episodes of several runs of one fold as one set (same classes)."""
    if not parts or len({p.num_classes for p in parts}) > 1:
        raise ValueError("concat needs at least one part, all with the same number of classes")
    return EpisodeCounts(np.concatenate([p.class_idx for p in parts]), np.concatenate([p.inter for p in parts]),
                         np.concatenate([p.union for p in parts]), parts[0].num_classes)
