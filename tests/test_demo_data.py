import json

import cv2
import numpy as np
import pytest

import dataset.demo as demo
from dataset.lists import read_data_list, read_label, read_sub_class_file_list
from dataset.splits import base_classes, novel_classes

NUM_TRAIN, NUM_VAL = 60, 80


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return demo.generate_demo(tmp_path_factory.mktemp("demo"), seed=0,
                              num_train=NUM_TRAIN, num_val=NUM_VAL)


def data_files(root):
    return sorted(p.relative_to(root) for d in ("JPEGImages", "SegmentationClassAug")
                  for p in (root / d).iterdir())


def fss_lists(root, mode, fold):
    base = root / "lists" / "demo" / "fss_list" / mode
    return (read_data_list(str(base / f"data_list_{fold}.txt"), str(root)),
            read_sub_class_file_list(str(base / f"sub_class_file_list_{fold}.txt"), str(root)))


def test_same_seed_gives_identical_files_whatever_the_counts(bench, tmp_path):
    # A smaller run draws the same images: each image has its own generator.
    other = demo.generate_demo(tmp_path, seed=0, num_train=7, num_val=5)
    files = data_files(other)
    assert len(files) == 2 * (7 + 5)
    for rel in files:
        assert (other / rel).read_bytes() == (bench / rel).read_bytes(), rel
    img, label = demo.render_sample("val", 3, seed=0)
    assert np.array_equal(read_label(str(bench / "SegmentationClassAug/val_00003.png")), label)
    assert img.shape[:2] == label.shape and img.dtype == np.uint8


def test_different_seed_gives_different_files(bench, tmp_path):
    other = demo.generate_demo(tmp_path, seed=1, num_train=3, num_val=3)
    for rel in data_files(other):
        assert (other / rel).read_bytes() != (bench / rel).read_bytes(), rel


def test_labels_are_valid(bench):
    for i, rel in enumerate(p for p in data_files(bench) if p.suffix == ".png"):
        label = read_label(str(bench / rel))
        image = cv2.imread(str(bench / rel.parent.parent / "JPEGImages" / (rel.stem + ".jpg")))
        assert image.shape[:2] == label.shape
        assert all(160 <= s <= 240 for s in label.shape)
        values = set(np.unique(label).tolist())
        classes = values - {0, 255}
        assert values <= set(range(21)) | {255}
        assert 1 <= len(classes) <= 3, rel
        assert 255 in values and 0 in values
        assert (label == 255).mean() < 0.2
        # The void band separates every pair of different regions, as in VOC.
        for a, b in ((label[1:], label[:-1]), (label[:, 1:], label[:, :-1])):
            assert not np.any((a != b) & (a != 255) & (b != 255)), rel


def test_plain_and_fss_lists_parse_and_reference_existing_files(bench):
    for split, count in (("train", NUM_TRAIN), ("val", NUM_VAL)):
        pairs = read_data_list(str(bench / "lists/demo" / f"{split}.txt"), str(bench))
        assert [p[0].rsplit("/", 1)[1] for p in pairs] == \
            [f"{split}_{i:05d}.jpg" for i in range(count)]
    for fold in range(4):
        for mode, classes in (("train", base_classes("demo", fold)),
                              ("val", novel_classes("demo", fold))):
            data, sub = fss_lists(bench, mode, fold)
            assert sorted(sub) == classes
            assert data and all(mode + "_" in img and mode + "_" in lab for img, lab in data)
            listed = {p for entries in sub.values() for p in entries}
            assert listed == set(data)
            for c, entries in sub.items():
                for _, lab in entries:
                    assert (read_label(lab) == c).sum() >= demo.DEMO_MIN_PIXELS


def test_train_lists_follow_bam_rule(bench):
    all_train = read_data_list(str(bench / "lists/demo/train.txt"), str(bench))
    for fold in range(4):
        data, _ = fss_lists(bench, "train", fold)
        assert len(data) < len(all_train)  # images with novel classes were dropped
        novel = novel_classes("demo", fold)
        for _, lab in data:
            assert not np.isin(read_label(lab), novel).any(), (fold, lab)


def test_train_and_val_are_disjoint(bench):
    names = {s: {p[0] for p in read_data_list(str(bench / f"lists/demo/{s}.txt"), str(bench))}
             for s in ("train", "val")}
    assert names["train"] and names["val"] and not names["train"] & names["val"]
    train_img = cv2.imread(str(bench / "JPEGImages/train_00000.jpg"))
    val_img = cv2.imread(str(bench / "JPEGImages/val_00000.jpg"))
    assert train_img.shape != val_img.shape or not np.array_equal(train_img, val_img)


def test_every_novel_class_has_val_images_for_one_shot(bench):
    for fold in range(4):
        _, sub = fss_lists(bench, "val", fold)
        assert all(len(sub[c]) >= 2 for c in novel_classes("demo", fold)), (fold, sub.keys())


def test_ensure_demo_keeps_complete_and_regenerates_incomplete(tmp_path, monkeypatch):
    counts = dict(num_train=4, num_val=4)
    root = tmp_path
    demo.ensure_demo(root, seed=0, **counts)
    manifest = json.loads((root / demo.MANIFEST).read_text())
    assert manifest["seed"] == 0 and manifest["num_train"] == 4 and manifest["num_val"] == 4
    image = root / "JPEGImages/val_00002.jpg"
    original = image.read_bytes()

    def no_generation(*args, **kwargs):
        raise AssertionError("complete benchmark regenerated")

    with monkeypatch.context() as m:
        m.setattr(demo, "generate_demo", no_generation)
        demo.ensure_demo(tmp_path, seed=0, **counts)
    # An interrupted run leaves no manifest: ensure_demo must write everything again.
    (root / demo.MANIFEST).unlink()
    image.unlink()
    demo.ensure_demo(tmp_path, seed=0, **counts)
    assert image.read_bytes() == original and (root / demo.MANIFEST).is_file()
    demo.main(["--root", str(tmp_path), "--seed", "5", "--num-train", "4", "--num-val", "4"])
    assert json.loads((root / demo.MANIFEST).read_text())["seed"] == 5
    assert image.read_bytes() != original


def test_entry_scripts_keep_a_demo_of_other_settings(tmp_path, monkeypatch):
    """meta_test.py/train.py keep a complete benchmark the user generated with other settings,
    and generate the default one only where none is complete."""
    root = demo.generate_demo(tmp_path / "small", seed=3, num_train=4, num_val=4, size=64)
    before = (root / "JPEGImages/val_00001.jpg").read_bytes()
    calls = []
    monkeypatch.setattr(demo, "ensure_demo", calls.append)
    demo.ensure_demo_present(root)
    assert calls == []
    assert (root / "JPEGImages/val_00001.jpg").read_bytes() == before
    demo.ensure_demo_present(tmp_path / "none")
    assert calls == [tmp_path / "none"]


def test_bad_arguments_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="num_train"):
        demo.generate_demo(tmp_path, num_train=0)
    with pytest.raises(ValueError, match="split"):
        demo.render_sample("test", 0, seed=0)
    with pytest.raises(ValueError, match="class_id"):
        demo.class_shape_texture(21)


def test_each_class_has_its_own_texture_and_clutter_has_none_of_them():
    shapes, textures = zip(*(demo.class_shape_texture(c) for c in range(1, 21)))
    assert len(set(textures)) == 20  # format 2: only the texture tells classes c and c+10 apart
    assert shapes[:10] == shapes[10:] and len(set(shapes)) == 10
    assert not set(textures) & set(demo._CLUTTER_TEXTURES)


def test_clutter_objects_are_drawn():
    rng = np.random.default_rng(0)
    drawn = []
    for _ in range(20):
        img = np.full((200, 200, 3), 128, np.float32)
        demo._clutter_objects(img, rng)
        drawn.append((np.abs(img - 128).sum(-1) > 30).mean())
    assert 0.4 < np.mean(np.array(drawn) > 0.02) < 0.9  # Poisson(CLUTTER_MEAN = 2): some images have none
