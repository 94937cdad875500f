"""evaluation/report.py's fold summary: selection rules over folds with intervals, and the papers' numbers."""
import json

import pytest

from tests.test_analysis import CLASSES, ROUNDS, fake_records
from evaluation import report
from evaluation.analysis import COUNTS_FILE, analyse_pooled, analyse_seed, public, save_rule_counts


def write_fold(root, split: int, data_set: str = "pascal", counts: bool = True):
    per_seed = {510: analyse_seed(fake_records(split, 30), CLASSES, ROUNDS, draws=1000)}
    pooled = analyse_pooled(per_seed, CLASSES, ROUNDS, draws=1000)
    folder = root / f"split{split}"
    folder.mkdir()
    results = {"split": split, "data_set": data_set, "arch": "MSANet", "backbone": "resnet50", "shot": 1,
               "s2q_query_mask": "pseudo", "uses_query_labels": False, "warnings": [],
               "zero": {"miou_mean": pooled["rules"]["zero"]["miou"], "fbiou_mean": pooled["rules"]["zero"]["fbiou"]},
               "eftnet": {"miou_mean": pooled["rules"]["s2q"]["miou"], "fbiou_mean": pooled["rules"]["s2q"]["fbiou"]},
               "rules": {"per_seed": {"510": public(per_seed[510])}, "pooled": public(pooled)},
               "bootstrap": {"draws": 1000, "seed": 2024}}
    (folder / "results.json").write_text(json.dumps(results))
    if counts:
        save_rule_counts(folder / COUNTS_FILE, per_seed, CLASSES)
    return folder / "results.json"


def test_summary_with_all_folds(tmp_path, capsys):
    paths = [str(write_fold(tmp_path, split)) for split in range(4)]
    text = report.main(paths)
    assert "EFTNet s2q, label-free" in text and "oracle round *" in text
    rules = [line for line in text.splitlines() if line.startswith("EFTNet s2q, label-free")][0]
    assert rules.count("[") == 2  # mIoU and FB-IoU intervals over folds
    assert "MSANet, paper" in text and "68.52" in text
    assert "  95% interval, low" in text
    assert "folds not run" not in text


def test_summary_missing_folds_and_counts(tmp_path):
    paths = [str(write_fold(tmp_path, 0)), str(write_fold(tmp_path, 2, counts=False))]
    text = report.summary(paths)
    assert "a fold lacks its episode_counts.json" in text
    assert "folds not run: 1, 3" in text
    published = text[text.index("pascal MSANet resnet50 1-shot"):]
    assert "0.00" not in published.split("\n")[3]


def test_demo_summary_has_no_paper_table(tmp_path):
    text = report.summary([str(write_fold(tmp_path, 0, data_set="demo"))])
    assert "paper" not in text and "EFTNet s2q, label-free" in text


def test_bad_counts_file_is_one_message(tmp_path):
    path = write_fold(tmp_path, 0)
    (path.parent / COUNTS_FILE).write_text("{}")
    with pytest.raises(report.DataError, match=COUNTS_FILE):
        report.summary([str(path)])
