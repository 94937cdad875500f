import os

import cv2
import numpy as np
import pytest
from PIL import Image

from dataset.lists import (build_fss_lists, fss_list_files, read_data_list, read_label, read_sub_class_file_list,
                           write_fss_lists)

BAM = "../data/VOCdevkit2012/VOC2012/"


def _voc_tree(tmp_path, names=("a", "b", "c")):
    """data/VOCdevkit2012/VOC2012/{JPEGImages,SegmentationClassAug} with tiny files."""
    root = tmp_path / "data" / "VOCdevkit2012" / "VOC2012"
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClassAug").mkdir()
    for name in names:
        cv2.imwrite(str(root / "JPEGImages" / f"{name}.jpg"), np.zeros((4, 6, 3), np.uint8))
        cv2.imwrite(str(root / "SegmentationClassAug" / f"{name}.png"), np.zeros((4, 6), np.uint8))
    return root


def _line(name, prefix=BAM):
    return f"{prefix}JPEGImages/{name}.jpg {prefix}SegmentationClassAug/{name}.png\n"


def _expected(root, name):
    return (os.path.join(str(root), "JPEGImages", f"{name}.jpg"),
            os.path.join(str(root), "SegmentationClassAug", f"{name}.png"))


def test_bam_prefix_rewritten_against_data_root(tmp_path):
    root = _voc_tree(tmp_path)
    lst = tmp_path / "data_list_0.txt"
    lst.write_text(_line("a") + _line("b") + "\n")
    assert read_data_list(str(lst), str(root)) == [_expected(root, "a"), _expected(root, "b")]
    # data_root one level up: only "../data/" has to go.
    up = tmp_path / "data"
    assert read_data_list(str(lst), str(up)) == [_expected(root, "a"), _expected(root, "b")]


def test_plain_relative_list(tmp_path):
    root = _voc_tree(tmp_path)
    lst = tmp_path / "val.txt"
    lst.write_text(_line("c", prefix="") + _line("a", prefix=""))
    assert read_data_list(str(lst), str(root)) == [_expected(root, "c"), _expected(root, "a")]


def test_list_errors_name_file_and_line(tmp_path):
    root = _voc_tree(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_data_list(str(tmp_path / "nope.txt"), str(root))
    lst = tmp_path / "l.txt"
    lst.write_text(_line("a") + _line("zzz"))
    with pytest.raises(FileNotFoundError, match=r"l\.txt, line 2: .*zzz\.jpg"):
        read_data_list(str(lst), str(root))
    lst.write_text(_line("a") + _line("b") + "JPEGImages/a.jpg\n")
    with pytest.raises(ValueError, match=r"l\.txt, line 3"):
        read_data_list(str(lst), str(root))
    lst.write_text(_line("a") + _line("b", prefix="other/"))
    with pytest.raises(ValueError, match=r"line 2: other/JPEGImages/b\.jpg does not start"):
        read_data_list(str(lst), str(root))
    lst.write_text(_line("zzz"))
    with pytest.raises(FileNotFoundError, match=r"line 1: .*zzz\.jpg not found under data_root"):
        read_data_list(str(lst), str(root))


def test_sub_class_file_list_parsed_safely(tmp_path):
    root = _voc_tree(tmp_path)

    def pair(n):
        return f"{BAM}JPEGImages/{n}.jpg", f"{BAM}SegmentationClassAug/{n}.png"

    f = tmp_path / "sub_class_file_list_0.txt"
    f.write_text(repr({1: [pair("a"), pair("b")], 2: [], 3: [pair("c")]}))
    assert read_sub_class_file_list(str(f), str(root)) == {
        1: [_expected(root, "a"), _expected(root, "b")], 2: [], 3: [_expected(root, "c")]}
    marker = tmp_path / "executed"
    f.write_text(f"__import__('pathlib').Path({str(marker)!r}).touch()")
    with pytest.raises(ValueError, match="not a Python dict literal"):
        read_sub_class_file_list(str(f), str(root))
    assert not marker.exists()
    f.write_text(repr({1: [pair("a"), ("x",)]}))
    with pytest.raises(ValueError, match="class 1 entry 1"):
        read_sub_class_file_list(str(f), str(root))


def _labels():
    """Synthetic 64x64 labels; class pixel counts chosen around the 2,048 threshold."""
    def lab(*parts):
        flat = np.zeros(64 * 64, np.uint8)
        start = 0
        for value, count in parts:
            flat[start:start + count] = value
            start += count
        return flat.reshape(64, 64)
    return {
        "A": lab((1, 2048), (7, 1000), (255, 50)),  # novel 1 exactly at the threshold
        "B": lab((2, 2047)),                        # novel 2 one pixel short
        "C": lab((3, 3000), (4, 100)),              # 3 qualifies, 4 does not
        "D": lab((6, 3000), (8, 10)),               # base only
        "E": lab((9, 2048), (255, 2000)),           # base only
        "F": lab((5, 10), (10, 2500)),              # tiny novel 5 + base 10
    }


def test_build_fss_lists_val_rule():
    labels = _labels()
    pairs = [(f"{n}.jpg", n) for n in labels]
    data, sub = build_fss_lists(pairs, [1, 2, 3, 4, 5], "val", label_reader=labels.__getitem__)
    assert [p[1] for p in data] == ["A", "C"]
    assert {c: [p[1] for p in v] for c, v in sub.items()} == {1: ["A"], 2: [], 3: ["C"],
                                                              4: [], 5: []}


def test_build_fss_lists_train_bam_filter():
    labels = _labels()
    pairs = [(f"{n}.jpg", n) for n in labels]
    base = list(range(6, 21))
    data, sub = build_fss_lists(pairs, base, "train", label_reader=labels.__getitem__)
    # A has novel class 1 and F novel class 5: dropped although their base classes qualify.
    assert [p[1] for p in data] == ["D", "E"]
    assert sub[6] == [("D.jpg", "D")] and sub[9] == [("E.jpg", "E")]
    assert sub[7] == [] and sub[8] == [] and sub[10] == []
    with pytest.raises(ValueError, match="mode"):
        build_fss_lists(pairs, base, "test", label_reader=labels.__getitem__)


def test_write_then_read_round_trip(tmp_path):
    labels = _labels()
    root = _voc_tree(tmp_path, names=labels)
    for name, label in labels.items():
        cv2.imwrite(str(root / "SegmentationClassAug" / f"{name}.png"), label)
    lst = tmp_path / "val.txt"
    lst.write_text("".join(_line(n) for n in labels))
    data, sub = build_fss_lists(read_data_list(str(lst), str(root)), [1, 2, 3, 4, 5], "val")
    assert [os.path.basename(p[1]) for p in data] == ["A.png", "C.png"]
    out = tmp_path / "demo" / "fss_list" / "val"
    write_fss_lists(fss_list_files(tmp_path, "demo", "val", 0), data, sub, str(root))
    assert (out / "data_list_0.txt").read_text().splitlines()[0] == \
        "JPEGImages/A.jpg SegmentationClassAug/A.png"
    assert read_data_list(str(out / "data_list_0.txt"), str(root)) == data
    assert read_sub_class_file_list(str(out / "sub_class_file_list_0.txt"), str(root)) == sub


def test_read_label_palette_and_gray(tmp_path):
    label = np.array([[0, 5, 15], [255, 9, 0]], np.uint8)
    palette = Image.fromarray(label, mode="P")
    palette.putpalette([(37 * i) % 256 for i in range(768)])
    palette.save(tmp_path / "p.png")
    Image.fromarray(label, mode="L").save(tmp_path / "l.png")
    np.testing.assert_array_equal(read_label(str(tmp_path / "p.png")), label)
    np.testing.assert_array_equal(read_label(str(tmp_path / "l.png")), label)
    # The pitfall read_label avoids: a grayscale read turns palette colours into luminance.
    assert not np.array_equal(cv2.imread(str(tmp_path / "p.png"), cv2.IMREAD_GRAYSCALE), label)


def test_read_label_errors(tmp_path):
    Image.new("RGB", (3, 2)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match=r"rgb\.png.*'RGB'"):
        read_label(str(tmp_path / "rgb.png"))
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"junk\.png"):
        read_label(str(tmp_path / "junk.png"))
    with pytest.raises(FileNotFoundError, match=r"missing\.png"):
        read_label(str(tmp_path / "missing.png"))
