"""evaluation/report.py's fold summary: selection rules over folds with intervals, and the papers' numbers."""
import json

import pytest

from tests.test_analysis import CLASSES, ROUNDS, fake_records
from evaluation import report
from evaluation.analysis import COUNTS_FILE, analyse_pooled, analyse_seed, public, save_rule_counts


def write_fold(root, split: int, data_set: str = "pascal", counts: bool = True, arch: str = "MSANet",
               shot: int = 1, backbone: str = "resnet50", query_mask: str = "pseudo", round_selection: str = "s2q"):
    per_seed = {510: analyse_seed(fake_records(split, 30), CLASSES, ROUNDS, draws=1000)}
    pooled = analyse_pooled(per_seed, CLASSES, ROUNDS, draws=1000)
    folder = root / f"split{split}"
    folder.mkdir()
    results = {"split": split, "data_set": data_set, "arch": arch, "backbone": backbone, "shot": shot,
               "s2q_query_mask": query_mask, "uses_query_labels": query_mask == "ground_truth", "warnings": [],
               "zero": {"miou_mean": pooled["rules"]["zero"]["miou"], "fbiou_mean": pooled["rules"]["zero"]["fbiou"]},
               "eftnet": {"miou_mean": pooled["rules"]["s2q"]["miou"], "fbiou_mean": pooled["rules"]["s2q"]["fbiou"]},
               "rules": {"per_seed": {"510": public(per_seed[510])}, "pooled": public(pooled)},
               "bootstrap": {"draws": 1000, "seed": 2024}, "settings": {"round_selection": round_selection}}
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


def test_summary_prints_eftnet_paper_row_and_whether_the_run_is_comparable(tmp_path):
    for query_mask in ("pseudo", "ground_truth"):
        root = tmp_path / query_mask
        root.mkdir()
        text = report.summary([str(write_fold(root, split, query_mask=query_mask)) for split in range(4)])
        paper = [line for line in text.splitlines() if line.startswith("EFTNet, paper *")]
        assert len(paper) == 1 and paper[0].split("|")[2].split() == ["70.01"]
        assert ("this run is label-free" in text) == (query_mask == "pseudo")
        assert ("as this run does (s2q_query_mask: ground_truth)" in text) == (query_mask == "ground_truth")


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


def test_miniature_table_rows_per_base_model_columns_per_shot(tmp_path):
    runs = {("MSANet", 1): (0, 1, 2, 3), ("MSANet", 5): (0, 1, 2, 3), ("BAM", 1): (0, 1, 2, 3), ("BAM", 5): (0, 1)}
    for (arch, shot), splits in runs.items():
        folder = tmp_path / f"{arch}_mobilenetv2_{shot}shot" / "default"
        folder.mkdir(parents=True)
        for split in splits:
            write_fold(folder, split, data_set="demo", arch=arch, shot=shot, backbone="mobilenetv2")
    text = report.main(["--miniature", str(tmp_path)])
    lines = text.splitlines()
    assert "1-shot" in lines[0] and "5-shot" in lines[0] and lines[0].index("1-shot") < lines[0].index("5-shot")
    rows = [line for line in lines[2:] if "|" in line]
    assert [r.split("|")[0].strip() for r in rows] == ["MSANet (mobilenetv2)", "+ EFTNet", "BAM (mobilenetv2)",
                                                      "+ EFTNet"]
    # The cells are the folds' means; EFTNet's gain is in parentheses with its paired interval.
    msanet = [read_json(tmp_path / "MSANet_mobilenetv2_1shot/default" / f"split{s}/results.json") for s in range(4)]
    zero = sum(100 * r["zero"]["miou_mean"] for r in msanet) / 4
    eft = sum(100 * r["eftnet"]["miou_mean"] for r in msanet) / 4
    assert rows[0].split("|")[1].strip() == f"{zero:.2f}"
    cell = rows[1].split("|")[1].strip()
    assert cell.startswith(f"{eft:.2f} ({eft - zero:+.2f}) [") and cell.endswith("]")
    assert "(4 folds)" in rows[0] and "(2/4 folds)" in rows[2]


def test_miniature_refuses_two_runs_of_one_setting(tmp_path):
    for tag in ("a", "b"):
        folder = tmp_path / "MSANet_mobilenetv2_1shot" / tag
        folder.mkdir(parents=True)
        write_fold(folder, 0, data_set="demo", backbone="mobilenetv2")
    with pytest.raises(report.DataError, match="two runs of the same setting and fold"):
        report.miniature_runs(tmp_path)


def read_json(path):
    return json.loads(path.read_text())


def test_rules_overview_puts_every_label_free_rule_against_s2q(tmp_path):
    """--rules: s2q against the base model, then each label-free rule against s2q, per setting;
    rules that read labels (oracle) are left out."""
    for arch, shot in (("MSANet", 1), ("BAM", 5)):
        folder = tmp_path / f"{arch}_{shot}" / "tag"
        folder.mkdir(parents=True)
        for split in range(4):
            write_fold(folder, split, data_set="demo", arch=arch, shot=shot, backbone="mobilenetv2")
    text = report.main(["--rules", str(tmp_path)])
    lines = text.splitlines()
    assert lines[0].split("|")[1].strip() == "MSANet 1-shot" and lines[0].split("|")[2].strip() == "BAM 5-shot"
    assert lines[2].startswith("s2q - base model") and "last round - s2q" in text and "fixed round 1 - s2q" in text
    assert "oracle" not in text and "s2q - s2q" not in text
    counts = [report.read_counts(tmp_path / "MSANet_1" / "tag" / f"split{k}" / "results.json") for k in range(4)]
    both = report.folds_comparison(counts, "last", 1000, 2024, "s2q")  # the runs' bootstrap: 1000 draws
    row = next(line for line in lines if line.startswith("last round - s2q")).split("|")[1].strip()
    assert row == f"{100 * both['miou']['point']:+.2f} [{100 * both['miou']['low']:+.2f},{100 * both['miou']['high']:+.2f}]"


def test_a_runs_own_answer_is_its_round_selection(tmp_path):
    """The miniature's interval belongs to the rule the run answered with, not always to s2q."""
    paths = [write_fold(tmp_path, split, data_set="demo", round_selection="s2q_stop") for split in range(4)]
    counts = [report.read_counts(p) for p in paths]
    stop = report.folds_comparison(counts, "s2q_stop", 1000, 2024)
    s2q = report.folds_comparison(counts, "s2q", 1000, 2024)
    assert stop["miou"]["low"] != s2q["miou"]["low"]
    _, cell = report._setting_cells(paths)
    assert cell.endswith(f"[{100 * stop['miou']['low']:+.2f},{100 * stop['miou']['high']:+.2f}]")
    assert report.engine_rule({"uses_query_labels": True}) == "s2q_gt" and report.engine_rule({}) == "s2q"


def test_rules_overview_of_base_only_runs_is_one_message(tmp_path, capsys):
    folder = tmp_path / "MSANet_1" / "tag"
    folder.mkdir(parents=True)
    for split in range(2):
        path = write_fold(folder, split, data_set="demo", backbone="mobilenetv2")
        results = json.loads(path.read_text())
        del results["rules"], results["eftnet"]
        path.write_text(json.dumps(results))
    with pytest.raises(SystemExit) as exit_info:
        report.main(["--rules", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "Traceback" not in err
    assert "runs without EFTNet's rules (loop_ft False)" in err and str(folder) in err
