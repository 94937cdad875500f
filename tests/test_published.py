"""evaluation/published.py: published numbers beside ours; folds not run are missing, not zero."""
import pytest

from evaluation.published import FOLDS, PUBLISHED, comparison_table, published


def row(table: str, label: str) -> list[str]:
    for line in table.splitlines():
        if line.startswith(label):
            return line.split("|")[1].split() + line.split("|")[2].split()
    raise AssertionError(f"no row {label!r} in\n{table}")


def test_published_entries_are_consistent():
    for (data_set, arch, backbone, shot), rows in PUBLISHED.items():
        assert data_set in ("pascal", "coco") and arch in ("MSANet", "BAM") and shot in (1, 5)
        for entry in rows:
            assert len(entry.folds) == len(FOLDS) and entry.source
            if entry.mean is not None and all(v is not None for v in entry.folds):
                # Stated means agree with their folds up to the papers' rounding.
                assert sum(entry.folds) / 4 == pytest.approx(entry.mean, abs=0.02)
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
    assert row(table, "EFTNet, paper") == ["-"] * 5
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
