import logging
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dataset.fewshot import EpisodeDataset, build_episode_dataset
from dataset.episodes import Episode, load_episodes, make_episodes, save_episodes
from dataset.lists import fss_list_files, write_fss_lists

NOVEL = [1, 2, 3, 4, 5]  # PASCAL / demo fold 0


def _label(classes):
    """72x96: vertical bands of 2,048 pixels per class above a void band of 8 rows."""
    label = np.zeros((72, 96), np.uint8)
    for k, c in enumerate(classes):
        label[:64, 32 * k:32 * k + 32] = c
    label[64:] = 255
    return label


# Every novel class is in at least four images (enough for 3-shot episodes).
LABELS = {f"q{i}": _label(cs) for i, cs in enumerate(
    [[1, 7], [1, 2], [2, 3, 9], [3, 1], [4, 5], [5, 4, 1], [2, 4], [3, 5], [2, 3, 4], [5, 2]])}


def _lists():
    data = [(f"{n}.jpg", n) for n in LABELS]
    sub = {c: [p for p in data if c in LABELS[p[1]]] for c in NOVEL}
    return data, sub


def _episodes(seed, shot=2, n=20, **kw):
    data, sub = _lists()
    return make_episodes(data, sub, NOVEL, shot, n, seed, label_reader=LABELS.__getitem__, **kw)


def test_same_seed_same_episodes_different_seed_differs():
    assert _episodes(5) == _episodes(5)
    assert _episodes(5) != _episodes(6)


def test_episode_protocol():
    data, _ = _lists()
    episodes = _episodes(0, shot=2, n=20)
    assert [e.query for e in episodes] == [data[i % len(data)] for i in range(20)]
    for e in episodes:
        assert e.class_id in NOVEL and e.class_id in LABELS[e.query[1]]
        assert len(e.supports) == 2 and len(set(e.supports)) == 2
        assert e.query not in e.supports
        assert all(e.class_id in LABELS[s[1]] for s in e.supports)


def test_supports_are_stored_in_reverse_draw_order():
    # One query with one class: the draw is one integer (the class) then one choice.
    data = [("x.jpg", "x")]
    pool = [(f"s{i}.jpg", f"s{i}") for i in range(6)]
    labels = {"x": _label([3])}
    (episode,) = make_episodes(data, {3: [data[0]] + pool}, NOVEL, 3, 1, seed=11,
                               label_reader=labels.__getitem__)
    rng = np.random.default_rng(11)
    rng.integers(1)
    drawn = [pool[j] for j in rng.choice(len(pool), size=3, replace=False)]
    assert episode.supports == drawn[::-1]
    assert episode.supports[0] == drawn[-1]


def test_each_query_label_read_once():
    reads = []

    def reader(path):
        reads.append(path)
        return LABELS[path]
    data, sub = _lists()
    make_episodes(data, sub, NOVEL, 1, 30, 0, label_reader=reader)
    assert sorted(reads) == sorted(LABELS)


def test_list_building_errors():
    data, sub = _lists()
    labels = dict(LABELS, bad=_label([7, 9]))
    with pytest.raises(ValueError, match=r"entry 2 \(line 3\) bad holds none"):
        make_episodes(data[:2] + [("bad.jpg", "bad")], sub, NOVEL, 1, 5, 0,
                      label_reader=labels.__getitem__)
    small = {**sub, 4: [data[4], data[5]]}
    with pytest.raises(ValueError, match=r"class 4 has 1 support candidates .* shot=2"):
        make_episodes(data[4:6], small, NOVEL, 2, 10, 0, label_reader=LABELS.__getitem__)


def test_save_load_round_trip(tmp_path):
    episodes = _episodes(3, shot=2)
    meta = {"seed": 3, "data_set": "pascal", "split": 0, "shot": 3}
    save_episodes(str(tmp_path / "e.json"), episodes, meta)
    loaded, loaded_meta = load_episodes(str(tmp_path / "e.json"))
    assert loaded == episodes and loaded_meta == meta
    assert isinstance(loaded[0].query, tuple) and isinstance(loaded[0].supports[0], tuple)
    (tmp_path / "x.json").write_text('{"episodes": []}')
    with pytest.raises(ValueError, match="not an episode file"):
        load_episodes(str(tmp_path / "x.json"))


# ----- the dataset on tiny files -------------------------------------------------------------

def _write_tree(tmp_path):
    root = tmp_path / "VOC2012"
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClassAug").mkdir()
    rng = np.random.default_rng(0)
    for name, label in LABELS.items():
        cv2.imwrite(str(root / "JPEGImages" / f"{name}.jpg"),
                    rng.integers(0, 256, (*label.shape, 3), dtype=np.uint8))
        cv2.imwrite(str(root / "SegmentationClassAug" / f"{name}.png"), label)
    lines = "".join(f"JPEGImages/{n}.jpg SegmentationClassAug/{n}.png\n" for n in LABELS)
    (tmp_path / "val.txt").write_text(lines)
    return root


def _cfg(tmp_path, root, **kw):
    base = dict(data_set="pascal", split=0, shot=2, use_split_coco=False, data_root=str(root),
                lists_root="", val_list=str(tmp_path / "val.txt"),
                val_size=33, test_num=12, episode_file=None)
    return SimpleNamespace(**{**base, **kw})


@pytest.mark.filterwarnings("ignore:This DataLoader will create 4 worker processes")
def test_dataset_items_identical_with_0_and_4_workers(tmp_path, caplog):
    root = _write_tree(tmp_path)
    with caplog.at_level(logging.INFO, logger="dataset.fewshot"):
        dataset, episodes = build_episode_dataset(_cfg(tmp_path, root), seed=7)
    assert "building the fold-0 lists" in caplog.text
    assert len(dataset) == 12 and episodes[0].query == ("JPEGImages/q0.jpg",
                                                        "SegmentationClassAug/q0.png")
    batches = {w: list(DataLoader(dataset, batch_size=1, num_workers=w)) for w in (0, 4)}
    for a, b in zip(*batches.values(), strict=True):
        assert a.keys() == b.keys()
        for k in a:
            if torch.is_tensor(a[k]):
                assert torch.equal(a[k], b[k]), k
            else:
                assert a[k] == b[k], k
    again, _ = build_episode_dataset(_cfg(tmp_path, root), seed=7)
    assert again.episodes == episodes


def test_dataset_item_fields(tmp_path):
    root = _write_tree(tmp_path)
    dataset, episodes = build_episode_dataset(_cfg(tmp_path, root, shot=3), seed=1)
    item = dataset[2]
    e = episodes[2]
    assert item["query_img"].shape == (3, 33, 33) and item["query_img"].dtype == torch.float32
    assert item["support_imgs"].shape == (3, 3, 33, 33)
    assert item["support_masks"].shape == (3, 33, 33)
    assert item["support_masks"].dtype == item["query_mask"].dtype == torch.int64
    assert set(item["support_masks"].unique().tolist()) == {0, 1, 255}
    assert item["padding"].shape == (33, 33) and item["padding"][24:, :].all()
    assert not item["padding"][:24, :32].any()                 # 72x96 -> 24x32 at size 33
    label = LABELS[e.query[1].split("/")[-1][:-4]]
    expected = np.where(label == 255, 255, (label == e.class_id).astype(np.int64))
    np.testing.assert_array_equal(item["query_mask_orig"].numpy(), expected)
    lut = np.arange(256)
    lut[1:21] = [0] * 5 + list(range(1, 16))                  # fold 0: 6..20 -> 1..15
    np.testing.assert_array_equal(item["query_base_orig"].numpy(), lut[label])
    # nearest 72x96 -> 24x32 keeps every third pixel; the rest of the canvas is 255
    assert torch.equal(item["query_mask_base"][:24, :32], item["query_base_orig"][::3, ::3])
    assert torch.equal(item["query_mask"][:24, :32], item["query_mask_orig"][::3, ::3])
    assert (item["query_mask"][item["padding"]] == 255).all()
    assert item["class_id"] == e.class_id and item["class_idx"] == e.class_id - 1
    assert item["episode_idx"] == 2 and item["query_name"] == e.query[0]
    assert item["support_names"] == [s[0] for s in e.supports]


def test_fss_list_files_and_episode_file(tmp_path):
    root = _write_tree(tmp_path)
    data, sub = _lists()

    def full(pair):
        return (str(root / "JPEGImages" / pair[0]),
                str(root / "SegmentationClassAug" / f"{pair[1]}.png"))

    write_fss_lists(fss_list_files(tmp_path / "lists", "pascal", "val", 0),
                    [full(p) for p in data], {c: [full(p) for p in v] for c, v in sub.items()},
                    str(root))
    cfg = _cfg(tmp_path, root, val_list=None, lists_root=str(tmp_path / "lists"))
    _, from_lists = build_episode_dataset(cfg, seed=4)
    assert from_lists == build_episode_dataset(_cfg(tmp_path, root), seed=4)[1]
    path = tmp_path / "episodes_4.json"
    save_episodes(str(path), from_lists[:5], {"seed": 4})
    pattern = str(tmp_path / "episodes_{seed}.json")
    _, loaded = build_episode_dataset(_cfg(tmp_path, root, episode_file=pattern, test_num=5), seed=4)
    assert loaded == from_lists[:5]
    with pytest.raises(ValueError, match="shot=1"):
        build_episode_dataset(_cfg(tmp_path, root, shot=1, episode_file=str(path), test_num=5), seed=4)
    with pytest.raises(ValueError, match="not a novel class"):
        build_episode_dataset(_cfg(tmp_path, root, split=1, episode_file=str(path), test_num=5), seed=4)
    with pytest.raises(ValueError, match=r"holds 5 episodes .* test_num=12: set test_num 5"):
        build_episode_dataset(_cfg(tmp_path, root, episode_file=str(path)), seed=4)
    with pytest.raises(FileNotFoundError, match=r"episode_file .*episodes_9\.json \(seed 9\) does not exist"):
        build_episode_dataset(_cfg(tmp_path, root, episode_file=pattern), seed=9)
    with pytest.raises(FileNotFoundError, match=r"lists_root .*elsewhere' was given but"):
        build_episode_dataset(_cfg(tmp_path, root, lists_root=str(tmp_path / "elsewhere")), seed=4)


def test_missing_inputs_and_bad_labels(tmp_path):
    root = _write_tree(tmp_path)
    with pytest.raises(FileNotFoundError, match="data_root not found: .*nowhere"):
        build_episode_dataset(_cfg(tmp_path, tmp_path / "nowhere"), seed=0)
    with pytest.raises(FileNotFoundError, match="val_list"):
        build_episode_dataset(_cfg(tmp_path, root, val_list=str(tmp_path / "no.txt")), seed=0)
    bad = _label([1, 23])
    cv2.imwrite(str(root / "SegmentationClassAug" / "q0.png"), bad)
    q = ("JPEGImages/q0.jpg", "SegmentationClassAug/q0.png")
    dataset = EpisodeDataset([Episode(q, 1, [q])], str(root), "pascal", 0, False, 33)
    with pytest.raises(ValueError, match=r"q0\.png holds values \[23\]"):
        dataset[0]
    with pytest.raises(ValueError, match="class 6 is not a novel class"):
        EpisodeDataset([Episode(q, 6, [q])], str(root), "pascal", 0, False, 33)
