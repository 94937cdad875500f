"""HSNet's evaluation protocol: its squash geometry and its episodes from its own list files."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

import meta_test
from dataset.fewshot import build_episode_dataset
from dataset.hsnet_episodes import hsnet_episodes
from dataset.transforms import squash_image, squash_label
from tests.tiny_demo import tiny_demo
from util.config import load_config
from util.errors import DataError


def test_squash_is_hsnets_test_transform():
    """PIL bilinear resize, ToTensor and Normalize as HSNet composes them; nearest labels."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8))
    hsnet = transforms.Compose([transforms.Resize(size=(400, 400)), transforms.ToTensor(),
                                transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    assert torch.equal(squash_image(image, 400), hsnet(image))
    label = rng.integers(0, 21, (375, 500)).astype(np.uint8)
    label[:5] = 255
    expected = F.interpolate(torch.tensor(label)[None, None].float(), (400, 400), mode="nearest")[0, 0].long()
    assert torch.equal(squash_label(label, 400), expected)


def hsnet_supports(names: list[str], query: str, shot: int) -> list[str]:
    """HSNet's support loop: draw one name at a time from the global generator, skip the query."""
    supports = []
    while True:
        name = np.random.choice(names, 1, replace=False)[0]
        if query != name:
            supports.append(name)
        if len(supports) == shot:
            return supports


def hsnet_pascal_loop(lines: list[str], shot: int, episodes: int) -> list[tuple[str, int, list[str]]]:
    """HSNet's PASCAL test sampling, written out with NumPy's global generator as its code runs it."""
    metadata = [(line.split("__")[0], int(line.split("__")[1]) - 1) for line in lines]
    classwise: dict[int, list[str]] = {c: [] for c in range(20)}
    for name, cls in metadata:
        classwise[cls].append(name)
    np.random.seed(0)
    out = []
    for idx in range(episodes):
        query, cls = metadata[idx % len(metadata)]
        out.append((query, cls + 1, hsnet_supports(classwise[cls], query, shot)))
    return out


def hsnet_coco_loop(lists: dict[int, list[str]], fold: int, shot: int, episodes: int) -> list[tuple[str, int, list[str]]]:
    """HSNet's COCO test sampling: a class uniformly, then its query, then the supports."""
    class_ids = [fold + 4 * v for v in range(20)]
    np.random.seed(0)
    out = []
    for _ in range(episodes):
        cls = np.random.choice(class_ids, 1, replace=False)[0]
        query = np.random.choice(lists[cls], 1, replace=False)[0]
        out.append((query, int(cls) + 1, hsnet_supports(lists[cls], query, shot)))
    return out


@pytest.mark.parametrize("shot", [1, 5])
def test_pascal_episodes_are_hsnets(tmp_path, shot):
    lines = [f"2008_{i:06d}__{c}" for i, c in enumerate([6, 7, 6, 8, 9, 10, 6, 7, 7, 9, 10, 8, 6])]
    path = tmp_path / "fold1.txt"
    path.write_text("\n".join(lines) + "\n")
    got = hsnet_episodes(path, "pascal", [6, 7, 8, 9, 10], shot, 30)
    expected = hsnet_pascal_loop(lines, shot, 30)
    assert [(e.query, e.class_id, e.supports) for e in got] == [
        ((f"JPEGImages/{q}.jpg", f"SegmentationClassAug/{q}.png"), c,
         [(f"JPEGImages/{s}.jpg", f"SegmentationClassAug/{s}.png") for s in supports]) for q, c, supports in expected]
    assert any(len(set(e.supports)) < shot for e in got) == (shot > 1)  # HSNet may draw a support twice


def test_coco_episodes_are_hsnets(tmp_path):
    lists = {c: [f"val2014/COCO_val2014_{c:03d}{i:09d}.jpg" for i in range(2 + c % 5)] for c in range(80)}
    path = tmp_path / "fold2.pkl"
    path.write_bytes(pickle.dumps(lists))
    novel = [3 + 4 * v for v in range(20)]
    got = hsnet_episodes(path, "coco", novel, 2, 40)
    expected = hsnet_coco_loop(lists, 2, 2, 40)
    assert [(e.query[0], e.class_id, [s[0] for s in e.supports]) for e in got] == expected
    assert got[0].query[1] == "annotations/" + got[0].query[0][:-4] + ".png"


def test_list_files_that_are_not_hsnets_refuse(tmp_path):
    bad = tmp_path / "fold0.txt"
    bad.write_text("2008_000001__3\n2008_000002 3\n")
    with pytest.raises(DataError, match=r"fold0.txt, line 2: expected '<image name>__<class 1..20>'"):
        hsnet_episodes(bad, "pascal", [1, 2, 3, 4, 5], 1, 5)
    other_fold = tmp_path / "fold_other.txt"
    other_fold.write_text("2008_000001__7\n2008_000002__7\n")
    with pytest.raises(DataError, match=r"lists classes \[7\], which are not novel classes \[1, 2, 3, 4, 5\]"):
        hsnet_episodes(other_fold, "pascal", [1, 2, 3, 4, 5], 1, 5)
    code = tmp_path / "fold0.pkl"
    code.write_bytes(pickle.dumps({0: np.array(["a.jpg"])}))  # needs numpy to unpickle: never run
    with pytest.raises(DataError, match="holds only a dict of class ids to image names; this one needs numpy"):
        hsnet_episodes(code, "coco", [1 + 4 * v for v in range(20)], 1, 5)
    with pytest.raises(FileNotFoundError, match="hsnet_list .*missing.txt does not exist"):
        hsnet_episodes(tmp_path / "missing.txt", "pascal", [1, 2, 3, 4, 5], 1, 5)


@pytest.fixture(scope="module")
def squashed_demo(tmp_path_factory):
    """The tiny demo under HSNet's protocol: an HSNet-format list of its val images, squash at 81 px."""
    root = tmp_path_factory.mktemp("hsnet_protocol")
    path = tiny_demo(root, {"reduce_dim": 16, "base_width": 16},
                     {"test_num": 4, "num_seeds": 1, "workers": 0, "tb_images": 0, "ft_number": 2})
    lines = []
    for line in (root / "demo" / "lists" / "demo" / "fss_list" / "val" / "data_list_0.txt").read_text().splitlines():
        image, label = line.split()
        present = set(np.unique(np.array(Image.open(root / "demo" / label))).tolist()) & {1, 2, 3, 4, 5}
        lines += [f"{image.split('/')[-1][:-4]}__{c}" for c in sorted(present)]
    (root / "fold0.txt").write_text("\n".join(lines) + "\n")
    opts = ["geometry", "squash", "val_size", "81", "hsnet_list", str(root / "fold{split}.txt")]
    return root, path, opts


def test_squashed_episodes_have_no_padding_and_labels_at_the_canvas_size(squashed_demo):
    root, path, opts = squashed_demo
    cfg = load_config(path, opts)
    dataset, episodes = build_episode_dataset(cfg, seed=510)
    item = dataset[0]
    assert episodes[0].query[0].startswith("JPEGImages/val_")
    assert item["query_img"].shape == (3, 81, 81) and item["support_imgs"].shape == (1, 3, 81, 81)
    assert item["query_mask_orig"].shape == (81, 81) and not item["padding"].any()
    assert torch.equal(item["query_mask"], item["query_mask_orig"])
    assert set(item["query_mask"].unique().tolist()) <= {0, 1, 255} and (item["query_mask"] == 1).any()


def test_meta_test_runs_hsnets_protocol_and_refuses_more_seeds(squashed_demo):
    root, path, opts = squashed_demo
    out = root / "run"
    results = meta_test.main(["--config", str(path), "--exp-dir", str(out), "--opts", *opts])
    assert results["seeds"][510]["episodes"] == 4
    saved = json.loads((out / "episodes_seed510.json").read_text())["episodes"]
    assert [e["query"][0] for e in saved] == [e.query[0] for e in build_episode_dataset(load_config(path, opts), 510)[1]]
    with pytest.raises(SystemExit) as refused:
        meta_test.main(["--config", str(path), "--exp-dir", str(root / "seeds"), "--opts", *opts, "num_seeds", "2"])
    assert refused.value.code == 2
