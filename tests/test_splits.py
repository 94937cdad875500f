import cv2
import numpy as np
import pytest

from dataset.get_mulway_base_data import main as base_data_main
from dataset.splits import base_classes, base_label_lut, novel_classes, num_classes
from util.config import BASE_CLASS_COUNT

# Fold tables (docs/reference_behaviour.md, section 1.5), written out rather than computed.
PASCAL = {0: [1, 2, 3, 4, 5], 1: [6, 7, 8, 9, 10], 2: [11, 12, 13, 14, 15],
          3: [16, 17, 18, 19, 20]}
COCO_INTERLEAVED = {
    0: [1, 5, 9, 13, 17, 21, 25, 29, 33, 37, 41, 45, 49, 53, 57, 61, 65, 69, 73, 77],
    1: [2, 6, 10, 14, 18, 22, 26, 30, 34, 38, 42, 46, 50, 54, 58, 62, 66, 70, 74, 78],
    2: [3, 7, 11, 15, 19, 23, 27, 31, 35, 39, 43, 47, 51, 55, 59, 63, 67, 71, 75, 79],
    3: [4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 48, 52, 56, 60, 64, 68, 72, 76, 80],
}
COCO_CONTIGUOUS = {i: list(range(20 * i + 1, 20 * i + 21)) for i in range(4)}


@pytest.mark.parametrize("split", range(4))
def test_folds_match_spec_tables(split):
    assert novel_classes("pascal", split) == PASCAL[split]
    assert novel_classes("demo", split) == PASCAL[split]
    assert novel_classes("pascal", split, use_split_coco=True) == PASCAL[split]
    assert novel_classes("coco", split, use_split_coco=True) == COCO_INTERLEAVED[split]
    assert novel_classes("coco", split) == COCO_CONTIGUOUS[split]
    for data_set, coco_split, table in [("pascal", False, PASCAL),
                                        ("coco", True, COCO_INTERLEAVED),
                                        ("coco", False, COCO_CONTIGUOUS)]:
        base = base_classes(data_set, split, coco_split)
        n = num_classes(data_set)
        assert base == sorted(set(range(1, n + 1)) - set(table[split]))
        assert len(base) == n * 3 // 4


@pytest.mark.parametrize("use_split_coco", [False, True])
@pytest.mark.parametrize("split", range(4))
def test_the_configs_base_class_count_is_every_folds(split, use_split_coco):
    """util/config.py sizes the base learner from the data set alone, as the reference does."""
    for data_set, count in BASE_CLASS_COUNT.items():
        assert len(base_classes(data_set, split, use_split_coco)) == count, data_set


def test_base_lists_examples():
    assert base_classes("pascal", 0) == list(range(6, 21))
    assert base_classes("pascal", 1) == [1, 2, 3, 4, 5] + list(range(11, 21))
    assert base_classes("coco", 0, True)[:6] == [2, 3, 4, 6, 7, 8]
    assert (num_classes("pascal"), num_classes("coco"), num_classes("demo")) == (20, 80, 20)


def test_lut_pascal_fold1():
    lut = base_label_lut("pascal", 1)
    assert lut.dtype == np.uint8 and lut.shape == (256,)
    assert lut[0] == 0 and lut[255] == 255
    assert lut[1:21].tolist() == [1, 2, 3, 4, 5, 0, 0, 0, 0, 0,
                                  6, 7, 8, 9, 10, 11, 12, 13, 14, 15]
    assert lut[21] == 21 and lut[254] == 254  # invalid ids stay visible to label validation


def test_lut_coco_interleaved():
    lut = base_label_lut("coco", 2, use_split_coco=True)
    assert lut[[3, 7, 79]].tolist() == [0, 0, 0]
    assert lut[[1, 2, 4, 80]].tolist() == [1, 2, 3, 60]


@pytest.mark.parametrize("bad", [("voc", 0), ("pascal", 4), ("pascal", -1), ("coco", 1.0)])
def test_bad_arguments(bad):
    with pytest.raises(ValueError, match="data_set|split"):
        novel_classes(*bad)


def _reference_base_annotation(label, data_set, split, use_split_coco=False):
    """BAM's rule, class by class: base class -> rank + 1, novel -> 0, others untouched."""
    base = base_classes(data_set, split, use_split_coco)
    out = label.copy()
    for c in range(1, num_classes(data_set) + 1):
        out[label == c] = base.index(c) + 1 if c in base else 0
    return out


def test_base_annotation_cli_equals_reference_rule(tmp_path):
    rng = np.random.default_rng(3)
    root = tmp_path / "voc"
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClassAug").mkdir()
    labels = {}
    lines = []
    for name in ("a", "b"):
        label = rng.integers(0, 21, (12, 17)).astype(np.uint8)
        label[0, :5] = 255
        labels[name] = label
        cv2.imwrite(str(root / "SegmentationClassAug" / f"{name}.png"), label)
        cv2.imwrite(str(root / "JPEGImages" / f"{name}.jpg"), np.zeros((12, 17, 3), np.uint8))
        lines.append(f"../data/VOCdevkit2012/VOC2012/JPEGImages/{name}.jpg "
                     f"../data/VOCdevkit2012/VOC2012/SegmentationClassAug/{name}.png\n")
    (tmp_path / "list.txt").write_text("".join(lines))
    out = tmp_path / "base"
    base_data_main(["--data-set", "pascal", "--data-root", str(root), "--list",
                    str(tmp_path / "list.txt"), "--split", "2", "--out", str(out)])
    for name, label in labels.items():
        written = cv2.imread(str(out / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        expected = _reference_base_annotation(label, "pascal", 2)
        assert written.dtype == np.uint8 and written.ndim == 2
        np.testing.assert_array_equal(written, expected)
        assert written[0, 0] == 255 and set(np.unique(written)) <= set(range(16)) | {255}
