"""evaluation/bootstrap.py against a direct computation with FewShotMeter, one draw at a time."""
import numpy as np
import pytest
import torch

import evaluation.bootstrap as bootstrap
from evaluation.bootstrap import (EpisodeCounts, concat, paired_bootstrap, paired_bootstrap_strata, pooled_over_folds,
                                  pooled_over_seeds)
from evaluation.metrics import FewShotMeter

DRAWS = 1000
SEED = 7


def make_counts(rng: np.random.Generator, class_idx, num_classes: int, fg_shift=0) -> EpisodeCounts:
    """Plausible per-episode counts on a 400-pixel canvas: t target fg pixels, i of them hit,
    p false positives. ``fg_shift`` turns that many misses into hits (negative: hits into misses),
    which keeps the fg union and shrinks the bg union by as much."""
    episodes = len(class_idx)
    target = rng.integers(60, 150, episodes)
    hits = rng.integers(20, target - 19) + fg_shift
    false_pos = rng.integers(0, 80, episodes)
    union_fg = target + false_pos
    return EpisodeCounts(np.asarray(class_idx), np.stack([400 - union_fg, hits], 1),
                         np.stack([400 - hits, union_fg], 1), num_classes)


def meter_of(counts: EpisodeCounts, picks, meter: FewShotMeter | None = None) -> FewShotMeter:
    """The episodes ``picks`` of ``counts`` added to ``meter`` (a new one by default)."""
    meter = FewShotMeter(counts.num_classes) if meter is None else meter
    for e in picks:
        meter.add(int(counts.class_idx[e]), torch.tensor(counts.inter[e]), torch.tensor(counts.union[e]),
                  torch.zeros(2))
    return meter


def direct_differences(pairs, combine: str, draws: int, seed: int) -> np.ndarray:
    """[draws, 2] (dmIoU, dFB-IoU) by explicit index draws and FewShotMeter sums, no matrices."""
    picks = [np.random.default_rng([seed, g]).integers(0, len(a), size=(draws, len(a))) for g, (a, _) in enumerate(pairs)]
    out = []
    for d in range(draws):
        if combine == "pool":
            meters = []
            for counts in (0, 1):
                meter = FewShotMeter(pairs[0][0].num_classes)
                for g, pair in enumerate(pairs):
                    meter_of(pair[counts], picks[g][d], meter)
                meters.append(meter)
            out.append([meters[0].class_miou() - meters[1].class_miou(), meters[0].fb_iou() - meters[1].fb_iou()])
        else:
            per_fold = []
            for g, (a, z) in enumerate(pairs):
                ma, mz = meter_of(a, picks[g][d]), meter_of(z, picks[g][d])
                per_fold.append([ma.class_miou() - mz.class_miou(), ma.fb_iou() - mz.fb_iou()])
            out.append(np.mean(per_fold, 0))
    return np.array(out)


@pytest.fixture(scope="module")
def hand_made():
    rng = np.random.default_rng(0)
    class_idx = [0, 0, 1, 2, 2, 2, 1, 0, 1, 2]
    return make_counts(rng, class_idx, 3), make_counts(rng, class_idx, 3)


def test_point_estimates_equal_fewshotmeter(hand_made):
    a, z = hand_made
    result = paired_bootstrap(a, z, draws=10, seed=SEED)
    meter_a, meter_z = meter_of(a, range(len(a))), meter_of(z, range(len(z)))
    assert result.miou_a == pytest.approx(meter_a.class_miou(), abs=1e-12)
    assert result.miou_z == pytest.approx(meter_z.class_miou(), abs=1e-12)
    assert result.fbiou_a == pytest.approx(meter_a.fb_iou(), abs=1e-12)
    assert result.miou.point == pytest.approx(meter_a.class_miou() - meter_z.class_miou(), abs=1e-12)
    assert a.class_miou() == pytest.approx(meter_a.class_miou(), abs=1e-12)
    assert a.fb_iou() == pytest.approx(meter_a.fb_iou(), abs=1e-12)


def test_class_never_drawn_counts_as_zero_like_the_meter():
    rng = np.random.default_rng(3)
    counts = make_counts(rng, [0, 0, 2, 2], 4)  # classes 1 and 3 never drawn
    meter = meter_of(counts, range(4))
    assert counts.class_miou() == pytest.approx(meter.class_miou(), abs=1e-12)
    assert counts.class_miou() < 0.5 * (meter.class_iou()[0] + meter.class_iou()[2]).item() + 1e-12


def test_interval_equals_direct_loop_computation(hand_made):
    a, z = hand_made
    result = paired_bootstrap(a, z, draws=DRAWS, seed=SEED)
    direct = direct_differences([(a, z)], "pool", DRAWS, SEED)
    low, high = np.percentile(direct, [2.5, 97.5], axis=0)
    assert (result.miou.low, result.miou.high) == pytest.approx((low[0], high[0]), abs=1e-12)
    assert (result.fbiou.low, result.fbiou.high) == pytest.approx((low[1], high[1]), abs=1e-12)
    assert result.draws == DRAWS and result.seed == SEED and result.episodes == len(a)


def test_pooled_over_seeds_and_folds_equal_direct_loop_computation():
    rng = np.random.default_rng(1)
    seeds = []
    for size in (6, 9):
        class_idx = rng.integers(0, 3, size)
        seeds.append((make_counts(rng, class_idx, 3), make_counts(rng, class_idx, 3)))
    draws = 300
    result = pooled_over_seeds(seeds, draws=draws, seed=SEED)
    direct = direct_differences(seeds, "pool", draws, SEED)
    assert (result.miou.low, result.miou.high) == pytest.approx(tuple(np.percentile(direct[:, 0], [2.5, 97.5])), abs=1e-12)
    assert result.episodes == 15

    folds = [seeds[0]]
    class_idx = rng.integers(0, 4, 8)  # another fold with its own number of classes
    folds.append((make_counts(rng, class_idx, 4), make_counts(rng, class_idx, 4)))
    result = pooled_over_folds(folds, draws=draws, seed=SEED)
    direct = direct_differences(folds, "mean", draws, SEED)
    assert (result.fbiou.low, result.fbiou.high) == pytest.approx(tuple(np.percentile(direct[:, 1], [2.5, 97.5])), abs=1e-12)
    fold_points = [paired_bootstrap(a, z, draws=1).miou.point for a, z in folds]
    assert result.miou.point == pytest.approx(np.mean(fold_points), abs=1e-12)


def test_pooled_over_seeds_point_is_the_concatenated_sample():
    rng = np.random.default_rng(4)
    seeds = []
    for _ in range(3):
        class_idx = rng.integers(0, 5, 20)
        seeds.append((make_counts(rng, class_idx, 5), make_counts(rng, class_idx, 5)))
    pooled = pooled_over_seeds(seeds, draws=50)
    whole = paired_bootstrap(concat([a for a, _ in seeds]), concat([z for _, z in seeds]), draws=50)
    assert pooled.miou.point == pytest.approx(whole.miou.point, abs=1e-12)
    assert pooled.miou_a == pytest.approx(whole.miou_a, abs=1e-12)


def test_blocks_of_draws_do_not_change_the_result(hand_made, monkeypatch):
    a, z = hand_made
    whole = paired_bootstrap(a, z, draws=DRAWS, seed=SEED)
    monkeypatch.setattr(bootstrap, "BLOCK_BYTES", 8 * len(a) * 7)  # blocks of 7 draws
    assert paired_bootstrap(a, z, draws=DRAWS, seed=SEED) == whole


def test_interval_excludes_zero_when_every_episode_improves():
    rng = np.random.default_rng(5)
    class_idx = rng.integers(0, 5, 200)
    z = make_counts(np.random.default_rng(6), class_idx, 5)
    a = make_counts(np.random.default_rng(6), class_idx, 5, fg_shift=10)  # same episodes, 10 more fg hits
    result = paired_bootstrap(a, z)
    assert result.improved == 1.0 and result.worsened == 0.0
    assert result.miou.low > 0 and result.fbiou.low > 0
    assert result.miou.low <= result.miou.point <= result.miou.high


def test_interval_includes_zero_for_identical_methods_and_symmetric_gains():
    rng = np.random.default_rng(8)
    class_idx = rng.integers(0, 5, 100)
    z = make_counts(rng, class_idx, 5)
    same = paired_bootstrap(z, z)
    assert same.miou == bootstrap.Interval(0.0, 0.0, 0.0)
    assert same.unchanged == 1.0 and same.miou.low <= 0 <= same.miou.high

    # Pairs of identical episodes: A gains 10 fg hits on one of each pair and loses them on the other.
    twins = np.repeat(class_idx[:50], 2)
    z = make_counts(np.random.default_rng(9), twins, 5)
    z = EpisodeCounts(twins, z.inter[np.repeat(np.arange(0, 100, 2), 2)], z.union[np.repeat(np.arange(0, 100, 2), 2)], 5)
    shift = np.tile([10, -10], 50)
    a = EpisodeCounts(twins, z.inter + np.stack([0 * shift, shift], 1), z.union - np.stack([shift, 0 * shift], 1), 5)
    result = paired_bootstrap(a, z)
    assert result.improved == result.worsened == 0.5
    assert result.miou.low < 0 < result.miou.high
    assert result.fbiou.low < 0 < result.fbiou.high


def test_shares_compare_ratios_exactly():
    z = EpisodeCounts([0, 0, 0], [[5, 1], [5, 2], [5, 0]], [[9, 2], [9, 3], [9, 0]], 1)
    a = EpisodeCounts([0, 0, 0], [[5, 2], [5, 1], [5, 0]], [[9, 4], [9, 3], [9, 0]], 1)  # 2/4 == 1/2
    result = paired_bootstrap(a, z, draws=10)
    assert (result.improved, result.worsened, result.unchanged) == pytest.approx((0, 1 / 3, 2 / 3))


def test_from_counts_reads_the_record_layout():
    records = [[[300, 40], [350, 60], [330, 50]], [[200, 10], [290, 100], [250, 70]]]
    counts = EpisodeCounts.from_counts([1, 0], records, 2)
    assert counts.inter.tolist() == [[300, 40], [200, 10]]
    assert counts.union.tolist() == [[350, 60], [290, 100]]
    assert counts.class_idx.tolist() == [1, 0]


def test_bad_inputs_are_refused(hand_made):
    a, z = hand_made
    other = EpisodeCounts(np.roll(a.class_idx, 1), a.inter, a.union, 3)
    with pytest.raises(ValueError, match="same episodes"):
        paired_bootstrap(a, other)
    with pytest.raises(ValueError, match="class_idx"):
        EpisodeCounts([0, 3], [[1, 1], [1, 1]], [[2, 2], [2, 2]], 3)
    with pytest.raises(ValueError, match="intersection <= union"):
        EpisodeCounts([0], [[3, 1]], [[2, 2]], 1)
    with pytest.raises(ValueError, match="combine"):
        paired_bootstrap_strata([(a, z)], "median")
    with pytest.raises(ValueError, match="same number of classes"):
        pooled_over_seeds([(a, z), (EpisodeCounts([0], [[1, 1]], [[2, 2]], 4),) * 2])
