"""The PASCAL loader on real VOC photos and palette masks (Debian package labelme-examples).

Three VOC2011 images: 2011_000003 bottle(5), person(15); 2011_000006 chair(9), person(15),
sofa(18); 2011_000025 bus(6), car(7). The first two have the 255 void band, the third none.
"""
import subprocess
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch

from dataset.fewshot import EpisodeDataset, build_episode_dataset
from dataset.episodes import Episode
from dataset.get_mulway_base_data import main as base_data_main
from dataset.lists import read_data_list, read_label
from dataset.splits import base_label_lut
from dataset.transforms import MEAN, STD, padding_map, resized_hw

NAMES = ("2011_000003", "2011_000006", "2011_000025")
CLASSES = {"2011_000003": {5, 15}, "2011_000006": {9, 15, 18}, "2011_000025": {6, 7}}
SIZES = {"2011_000003": (338, 500), "2011_000006": (375, 500), "2011_000025": (375, 500)}
SIZE = 121


def _find_voc() -> Path | None:
    try:
        files = subprocess.run(["dpkg", "-L", "labelme-examples"], capture_output=True,
                               text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return None
    tail = "semantic_segmentation/data_dataset_voc"
    dirs = [Path(f) for f in files if f.endswith(tail)]
    return dirs[0] if dirs and (dirs[0] / "JPEGImages").is_dir() else None


@pytest.fixture(scope="module")
def voc():
    """(data_root, label folder name); the package ships the PNGs in SegmentationClassPNG."""
    root = _find_voc()
    if root is None:
        pytest.skip("Debian package labelme-examples (real VOC photos + masks) is not installed")
    for folder in ("SegmentationClassPNG", "SegmentationClass"):
        if all((root / folder / f"{n}.png").is_file() for n in NAMES):
            return root, folder
    pytest.skip(f"labelme-examples at {root} lacks the VOC label PNGs")


@pytest.fixture
def val_list(voc, tmp_path):
    """A BAM-style list ('../data/VOCdevkit2012/VOC2012/' prefix) over the three images."""
    _, folder = voc
    prefix = "../data/VOCdevkit2012/VOC2012/"
    path = tmp_path / "val.txt"
    path.write_text("".join(f"{prefix}JPEGImages/{n}.jpg {prefix}{folder}/{n}.png\n"
                            for n in NAMES))
    return path


def _pair(voc, name):
    return f"JPEGImages/{name}.jpg", f"{voc[1]}/{name}.png"


def test_real_labels_class_ids_and_void(voc, val_list):
    pairs = read_data_list(str(val_list), str(voc[0]))
    assert [Path(p[0]).name for p in pairs] == [f"{n}.jpg" for n in NAMES]
    for name, (_, label_path) in zip(NAMES, pairs):
        label = read_label(label_path)
        assert label.shape == SIZES[name]
        assert set(np.unique(label).tolist()) - {0, 255} == CLASSES[name]
        assert (label == 255).any() == (name != "2011_000025")


def test_473_geometry_of_the_real_sizes():
    assert resized_hw(338, 500, 473) == (312, 472)
    assert resized_hw(375, 500, 473) == (352, 472)
    assert resized_hw(338, 500, SIZE) == (80, 120)
    assert resized_hw(375, 500, SIZE) == (88, 120)


@pytest.mark.parametrize("split, query, class_id, support", [
    (0, "2011_000003", 5, "2011_000006"),    # bottle
    (1, "2011_000025", 6, "2011_000006"),    # bus
    (1, "2011_000025", 7, "2011_000003"),    # car
    (1, "2011_000006", 9, "2011_000025"),    # chair
    (3, "2011_000006", 18, "2011_000003"),   # sofa
])
def test_loader_on_real_episode(voc, split, query, class_id, support):
    root = voc[0]
    dataset = EpisodeDataset([Episode(_pair(voc, query), class_id, [_pair(voc, support)])],
                             str(root), "pascal", split, False, SIZE)
    item = dataset[0]
    png = read_label(str(root / _pair(voc, query)[1]))
    h, w = SIZES[query]
    new_h, new_w = resized_hw(h, w, SIZE)

    expected = np.where(png == 255, 255, (png == class_id).astype(np.int64))
    assert item["query_mask_orig"].shape == (h, w) and item["query_mask_orig"].dtype == torch.int64
    np.testing.assert_array_equal(item["query_mask_orig"].numpy(), expected)
    np.testing.assert_array_equal(item["query_base_orig"].numpy(),
                                  base_label_lut("pascal", split)[png].astype(np.int64))
    assert int((item["query_mask_orig"] == 1).sum()) == int((png == class_id).sum())

    assert item["query_img"].shape == (3, SIZE, SIZE)
    assert item["support_imgs"].shape == (1, 3, SIZE, SIZE)
    assert item["support_masks"].shape == (1, SIZE, SIZE)
    assert int((~item["padding"]).sum()) == new_h * new_w
    assert not item["padding"][:new_h, :new_w].any()
    for mask in (item["query_mask"], item["query_mask_base"]):
        assert (mask[item["padding"]] == 255).all()
    # the support is padded by its own size, which can differ from the query's
    assert (item["support_masks"][0][padding_map(*SIZES[support], SIZE)] == 255).all()
    assert set(item["query_mask"].unique().tolist()) <= {0, 1, 255}
    assert (item["query_mask"][:new_h, :new_w] == 255).any() == (png == 255).any()  # void band
    assert (item["query_mask"] == 1).any()
    # Support masks are binary for the episode class: the support may not contain it at all.
    support_png = read_label(str(root / _pair(voc, support)[1]))
    assert (item["support_masks"][0] == 1).any() == (support_png == class_id).any()

    mean, std = torch.tensor(MEAN)[:, None, None], torch.tensor(STD)[:, None, None]
    pixels = item["query_img"] * std + mean
    inside = pixels[:, :new_h, :new_w]
    assert inside.min() >= -1e-3 and inside.max() <= 255 + 1e-3 and inside.std() > 10
    assert pixels[:, item["padding"]].abs().max() < 1e-3      # black canvas before normalising
    photo = cv2.cvtColor(cv2.imread(str(root / _pair(voc, query)[0])), cv2.COLOR_BGR2RGB)
    small = cv2.resize(np.float32(photo), (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    torch.testing.assert_close(inside, torch.from_numpy(small.transpose(2, 0, 1)),
                               atol=1e-3, rtol=0)
    assert item["class_idx"] == class_id - 1 - 5 * split


def test_episodes_from_plain_list_fold2_person(voc, val_list, tmp_path):
    cfg = SimpleNamespace(data_set="pascal", split=2, shot=1, use_split_coco=False,
                          data_root=str(voc[0]), lists_root="",  # no BAM lists: built from val_list
                          val_list=str(val_list), val_size=SIZE, test_num=4, episode_file=None)
    dataset, episodes = build_episode_dataset(cfg, seed=510)
    # 2011_000025 has no fold-2 class and is dropped; person queries the other image.
    assert [e.query[0] for e in episodes] == [f"JPEGImages/{n}.jpg" for n in NAMES[:2]] * 2
    assert all(e.class_id == 15 and e.supports[0] != e.query for e in episodes)
    item = dataset[1]
    assert item["query_name"] == "JPEGImages/2011_000006.jpg"
    assert item["support_names"] == ["JPEGImages/2011_000003.jpg"]
    assert (item["query_mask"] == 1).any() and (item["support_masks"] == 1).any()


def test_base_annotations_of_real_palette_labels(voc, val_list, tmp_path):
    out = tmp_path / "base"
    base_data_main(["--data-set", "pascal", "--data-root", str(voc[0]), "--list",
                    str(val_list), "--split", "1", "--out", str(out)])
    lut = base_label_lut("pascal", 1)
    for name in NAMES:
        written = cv2.imread(str(out / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(written, lut[read_label(str(voc[0] / _pair(voc, name)[1]))])
    assert set(np.unique(cv2.imread(str(out / "2011_000006.png"), cv2.IMREAD_UNCHANGED))) \
        == {0, 10, 13, 255}  # chair (novel) -> 0, person 15 -> 10, sofa 18 -> 13
