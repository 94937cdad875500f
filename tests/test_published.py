"""evaluation/published.py: published numbers beside ours; folds not run are missing, not zero."""
import pytest

from evaluation.published import EFTNET_PUBLISHED, FOLDS, PUBLISHED, comparison_table, eftnet_published, published


def row(table: str, label: str) -> list[str]:
    for line in table.splitlines():
        if line.startswith(label):
            return line.split("|")[1].split() + line.split("|")[2].split()
    raise AssertionError(f"no row {label!r} in\n{table}")


def test_published_entries_are_consistent():
    for (data_set, arch, backbone, shot), rows in PUBLISHED.items():
        assert data_set in ("pascal", "coco") and arch in ("MSANet", "BAM", "HSNet") and shot in (1, 5)
        for entry in rows:
            assert len(entry.folds) == len(FOLDS) and entry.source
            if entry.mean is not None and all(v is not None for v in entry.folds):
                # Stated means agree with their folds up to the papers' rounding (HSNet's: one decimal).
                assert sum(entry.folds) / 4 == pytest.approx(entry.mean, abs=0.06 if arch == "HSNet" else 0.02)
    assert published("pascal", "MSANet", "resnet50", 1)[0].mean == 68.52
    assert published("coco", "BAM", "resnet50", 5)[0].folds[1] == 54.20
    assert published("demo", "MSANet", "mobilenetv2", 1) == []


def test_missing_folds_are_shown_as_missing_not_zero():
    ours = {0: {"zero": 0.6900, "eftnet": 0.7010}, 2: {"zero": 0.6700, "eftnet": 0.6900}}
    table = comparison_table("pascal", "MSANet", "resnet50", 1, ours, {0: (0.001, 0.02)})
    assert row(table, "ours: MSANet (zero round)") == ["69.00", "-", "67.00", "-", "-"]
    assert row(table, "MSANet, paper") == ["69.25", "74.60", "67.84", "62.40", "68.52"]
    assert row(table, "  ours - that") == ["-0.25", "-", "-0.84", "-", "-"]
    assert row(table, "ours: EFTNet - zero") == ["+1.10", "-", "+2.00", "-", "-"]
    assert row(table, "EFTNet, paper *") == ["-", "-", "-", "-", "70.01"]
    assert row(table, "EFTNet, paper *")[-1] != "0.00"
    assert row(table, "  95% interval, low") == ["+0.10", "-", "-", "-", "-"]
    assert "0.00" not in table
    assert "folds not run: 1, 3" in table


def test_all_folds_give_means_and_differences():
    ours = {f: {"zero": 0.48, "eftnet": 0.50} for f in FOLDS}
    table = comparison_table("coco", "MSANet", "resnet50", 1, ours, {f: (0.001, 0.02) for f in FOLDS}, (0.01, 0.03))
    assert row(table, "MSANet, paper") == ["-", "-", "-", "-", "48.03"]
    assert row(table, "MSANet, checkpoint name")[-1] == "49.00"
    assert row(table, "ours: EFTNet - zero")[-1] == "+2.00"
    assert row(table, "  95% interval, high")[-1] == "+3.00"
    assert "folds not run" not in table


def test_base_model_only_and_unknown_setting():
    table = comparison_table("demo", "MSANet", "mobilenetv2", 1, {0: {"zero": 0.45}})
    assert "EFTNet" not in table
    assert "no published MSANet numbers for demo" in table


def test_eftnet_paper_means_are_the_readme_table():
    # EFTNet's README: means over folds only, on MSANet except COCO VGG16, which runs on BAM.
    means = {key: (entry.mean, entry.folds) for key, entry in EFTNET_PUBLISHED.items()}
    assert means[("pascal", "MSANet", "resnet50", 1)] == (70.01, (None,) * 4)
    assert means[("pascal", "MSANet", "vgg", 5)][0] == 71.07
    assert means[("coco", "BAM", "vgg", 1)][0] == 48.13
    assert means[("coco", "MSANet", "resnet101", 5)][0] == 59.13
    assert len(means) == 12
    assert eftnet_published("pascal", "BAM", "resnet50", 1) is None
    assert eftnet_published("coco", "MSANet", "vgg", 1) is None
    # Every EFTNet row's base model has a published mean, and the README's gains follow from the two.
    gains = {("pascal", "MSANet", "vgg", 1): 1.10, ("pascal", "MSANet", "resnet101", 5): 0.89,
             ("coco", "BAM", "vgg", 1): 4.63, ("coco", "MSANet", "resnet50", 5): 2.54}
    for key, gain in gains.items():
        assert EFTNET_PUBLISHED[key].mean - published(*key)[0].mean == pytest.approx(gain, abs=1e-9)


def test_eftnet_paper_row_beside_ours_with_its_selection_noted():
    ours = {f: {"zero": 0.68, "eftnet": 0.71} for f in FOLDS}
    label_free = comparison_table("pascal", "MSANet", "resnet50", 1, ours, query_mask="pseudo")
    assert row(label_free, "EFTNet, paper *") == ["-", "-", "-", "-", "70.01"]
    assert row(label_free, "ours: EFTNet") == ["71.00"] * 5
    assert row(label_free, "EFTNet, paper - MSANet, paper")[-1] == "+1.49"
    lines = label_free.splitlines()
    after_paper = lines[lines.index(next(l for l in lines if l.startswith("EFTNet, paper *"))) + 1]
    assert after_paper.split("|")[2].split() == ["+0.99"]   # 71.00 - 70.01
    assert "this run is label-free (s2q_query_mask: pseudo), not comparable" in label_free
    assert "EFTNet, paper: EFTNet README mean over the four folds" in label_free
    matched = comparison_table("pascal", "MSANet", "resnet50", 1, ours, query_mask="ground_truth")
    assert "label-free" not in matched
    assert "as this run does (s2q_query_mask: ground_truth): the comparable run" in matched
    assert row(matched, "EFTNet, paper *")[-1] == "70.01"


def test_base_only_run_shows_eftnet_paper_row_without_ours():
    table = comparison_table("coco", "BAM", "vgg", 5, {f: {"zero": 0.47} for f in FOLDS})
    assert row(table, "EFTNet, paper *")[-1] == "53.28"
    assert row(table, "EFTNet, paper - BAM, paper")[-1] == "+3.94"
    assert "ours: EFTNet" not in table and "label-free" not in table
    assert "the comparable run is s2q_query_mask: ground_truth" in table


def test_setting_without_eftnet_paper_number_has_no_eftnet_paper_row():
    ours = {f: {"zero": 0.68, "eftnet": 0.70} for f in FOLDS}
    for setting in (("pascal", "BAM", "resnet50", 1), ("coco", "MSANet", "vgg", 5)):
        table = comparison_table(*setting, ours, query_mask="pseudo")
        assert "EFTNet, paper" not in table and "*" not in table
        assert row(table, "ours: EFTNet")[-1] == "70.00"


def test_hsnet_rows_are_its_papers_table():
    """HSNet's means as quoted: PASCAL-5i VGG16/R50/R101, COCO-20i R50/R101."""
    means = {("pascal", "vgg"): (59.7, 64.1), ("pascal", "resnet50"): (64.0, 69.5), ("pascal", "resnet101"): (66.2, 70.4),
             ("coco", "resnet50"): (39.2, 46.9), ("coco", "resnet101"): (41.2, 49.5)}
    for (data_set, backbone), by_shot in means.items():
        for shot, mean in zip((1, 5), by_shot):
            (row,) = published(data_set, "HSNet", backbone, shot)
            assert row.method == "HSNet" and row.mean == mean
    assert published("coco", "HSNet", "vgg", 1) == []  # HSNet released no COCO VGG16 model
