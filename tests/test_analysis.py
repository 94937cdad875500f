"""evaluation/analysis.py on synthetic episode records: every rule, pooled seeds, table, plots, fold counts."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from evaluation.analysis import (GroundTruthScores, analyse_pooled, analyse_seed, folds_comparison, format_analysis,
                                 load_rule_counts, public, save_rule_counts, tensorboard_scalars, write_plots)
from evaluation.records import Scores, round_fields
from model.round_selection import best_round

ROUNDS = 3
CLASSES = 4


def fake_counts(rng, hits: int, target: int = 120, false_pos: int = 30) -> list[list[int]]:
    return [[400 - target - false_pos, hits], [400 - hits, target + false_pos], [400 - target, target]]


def fake_records(seed: int, episodes: int, with_gt: bool = True, stop_at: int | None = None) -> list[dict]:
    rng = np.random.default_rng(seed)
    records = []
    for i in range(episodes):
        zero_hits = int(rng.integers(30, 90))
        rounds = ROUNDS if stop_at is None or i % 5 else stop_at  # every fifth episode stops early
        hits = [min(120, zero_hits + int(rng.integers(-5, 25))) for _ in range(rounds)]
        scores = [float(rng.uniform(0.4, 0.8)) for _ in range(rounds)]
        zero = fake_counts(rng, zero_hits)
        chosen = best_round(scores)
        eft = fake_counts(rng, hits[chosen - 1])
        record = {"episode": i, "class_idx": int(rng.integers(0, CLASSES)),
                  "zero": {"final": zero, "meta": zero}, "eftnet": {"final": eft, "meta": eft},
                  "base": [[1, 1], [2, 2], [2, 2]],
                  "rounds": {"scores": scores, "chosen": chosen, "losses": [0.1] * (rounds - 1),
                             "stopped_early": rounds < ROUNDS, "counts": [fake_counts(rng, h) for h in hits]}}
        if with_gt:
            record["rounds"]["gt_scores"] = [float(rng.uniform(0.4, 0.8)) for _ in range(rounds)]
        records.append(record)
    return records


@pytest.fixture(scope="module")
def run():
    per_seed = {s: analyse_seed(fake_records(s, 40, stop_at=2), CLASSES, ROUNDS, draws=500) for s in (11, 12)}
    return per_seed, analyse_pooled(per_seed, CLASSES, ROUNDS, draws=500)


def test_rules_match_the_meters_and_the_engines_choice(run):
    per_seed, _ = run
    records = fake_records(11, 40, stop_at=2)
    scores = Scores(CLASSES, 1)
    for r in records:
        scores.add(r)
    summary = scores.summary(True)
    rules = per_seed[11]["rules"]
    assert rules["zero"]["miou"] == pytest.approx(summary["zero"]["miou"], abs=1e-12)
    assert rules["s2q"]["miou"] == pytest.approx(summary["eftnet"]["miou"], abs=1e-12)
    assert rules["s2q"]["fbiou"] == pytest.approx(summary["eftnet"]["fbiou"], abs=1e-12)
    assert rules["s2q"]["vs_zero"]["miou"]["point"] == pytest.approx(
        summary["eftnet"]["miou"] - summary["zero"]["miou"], abs=1e-12)
    assert rules["oracle"]["miou"] >= max(rules[f"round_{r}"]["miou"] for r in range(1, ROUNDS + 1)) - 0.02
    assert sum(rules["last"]["chosen_rounds"]) == 40 and rules["last"]["chosen_rounds"][2] == 8  # 8 early stops
    assert per_seed[11]["round_miou"][0] == pytest.approx(rules["zero"]["miou"])
    assert per_seed[11]["round_miou"][ROUNDS] == pytest.approx(rules["last"]["miou"])
    json.dumps(public(per_seed[11]))  # JSON-able


def test_pooled_and_table(run):
    per_seed, pooled = run
    assert pooled["episodes"] == 80 and pooled["seeds"] == 2
    assert pooled["rules"]["s2q"]["chosen_rounds"] == list(
        np.add(per_seed[11]["rules"]["s2q"]["chosen_rounds"], per_seed[12]["rules"]["s2q"]["chosen_rounds"]))
    text = format_analysis(per_seed, pooled, 500, 2024)
    assert "all 2 seeds pooled: 80 episodes" in text
    assert "EFTNet s2q, query GT *" in text and "oracle round *" in text
    assert "EFTNet s2q, label-free |" in text or "EFTNet s2q, label-free " in text
    scalars = tensorboard_scalars(pooled, "pooled")
    assert "pooled/s2q/dmiou_low" in scalars and "pooled/zero/miou" in scalars


def test_records_without_gt_scores_have_no_gt_rule():
    analysis = analyse_seed(fake_records(3, 10, with_gt=False), CLASSES, ROUNDS, draws=100)
    assert "s2q_gt" not in analysis["rules"] and not analysis["with_gt_scores"]


def test_plots_are_written(run, tmp_path):
    per_seed, pooled = run
    images = write_plots(tmp_path, per_seed, pooled)
    assert set(images) == {"round_miou", "round_s2q_scores", "chosen_rounds", "gains", "s2q_score_vs_iou"}
    for name, image in images.items():
        assert (tmp_path / f"plot_{name}.png").stat().st_size > 5000
        assert image.dtype == np.uint8 and image.shape[2] == 3


def test_rule_counts_round_trip_and_fold_comparison(run, tmp_path):
    per_seed, pooled = run
    save_rule_counts(tmp_path / "counts.json", per_seed, CLASSES)
    loaded = load_rule_counts(tmp_path / "counts.json")
    assert loaded["s2q"].class_miou() == pytest.approx(pooled["rules"]["s2q"]["miou"], abs=1e-12)
    other = analyse_seed(fake_records(5, 30), CLASSES, ROUNDS, draws=10)
    save_rule_counts(tmp_path / "b.json", {5: other}, CLASSES)
    result = folds_comparison([loaded, load_rule_counts(tmp_path / "b.json")], "s2q", draws=300)
    expected = np.mean([loaded["s2q"].class_miou() - loaded["zero"].class_miou(),
                        other["rules"]["s2q"]["miou"] - other["rules"]["zero"]["miou"]])
    assert result["miou"]["point"] == pytest.approx(expected, abs=1e-12)
    assert result["miou"]["low"] <= result["miou"]["point"] <= result["miou"]["high"]
    assert folds_comparison([loaded], "no_such_rule") is None


def test_ground_truth_observer_and_round_fields():
    mask = torch.ones(1, 9, 9, dtype=torch.long)
    observer = GroundTruthScores(mask)
    seen = []
    for index in (1, 2):
        observer(SimpleNamespace(index=index, s2q_score=lambda m: seen.append(m) or 0.25 * index))
    assert observer.scores == [0.25, 0.5] and all(m is mask for m in seen)

    label = torch.tensor([[0, 1], [1, 255]])
    logits = torch.zeros(1, 2, 2, 2)
    logits[:, 1] = 1.0  # foreground everywhere
    fields = round_fields([SimpleNamespace(final=logits)], label, [0.5])
    assert fields == {"counts": [[[0, 2], [1, 3], [1, 2]]], "gt_scores": [0.5], "label_free": True}


def test_ground_truth_run_records(tmp_path):
    """A ``s2q_query_mask: ground_truth`` run: its engine scores are ground-truth scores, so there
    is no label-free rule, and the reference rule is the run's EFTNet."""
    records = fake_records(4, 20, with_gt=False)
    for r in records:
        r["rounds"]["label_free"] = False
        r["rounds"]["gt_scores"] = r["rounds"]["scores"]
    per_seed = {4: analyse_seed(records, CLASSES, ROUNDS, draws=100)}
    pooled = analyse_pooled(per_seed, CLASSES, ROUNDS, draws=100)
    assert "s2q" not in pooled["rules"] and pooled["rules"]["s2q_gt"]["reads_labels"]
    scores = Scores(CLASSES, 1)
    for r in records:
        scores.add(r)
    assert pooled["rules"]["s2q_gt"]["miou"] == pytest.approx(scores.summary(True)["eftnet"]["miou"], abs=1e-12)
    assert len(write_plots(tmp_path, per_seed, pooled)) == 5
