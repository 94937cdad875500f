"""Few-shot test episodes as a torch Dataset, and building them from a config.

Every item is a named dict (see EpisodeDataset.__getitem__). The episode list is fixed before
the dataset exists (util/episodes.py), so items do not depend on DataLoader workers. Base
labels are computed on the fly with the base-annotation lookup table instead of read from
``base_annotation/`` PNGs (identical values, see util/get_mulway_base_data.py).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from util.episodes import Episode, load_episodes, make_episodes
from util.lists import (Pair, build_fss_lists, read_data_list, read_label,
                        read_sub_class_file_list)
from util.splits import IGNORE, base_label_lut, novel_classes, num_classes
from util.transforms import padding_map, transform_image, transform_label

REPO_ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger(__name__)


def read_image(path: str) -> np.ndarray:
    """Image file as float32 HxWx3 RGB (read with cv2 like the reference)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"cannot decode image file {path}")
    return np.float32(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))


def binary_mask(label: np.ndarray, class_id: int) -> np.ndarray:
    """int64 mask: class_id -> 1, void 255 stays 255, everything else -> 0."""
    mask = (label == class_id).astype(np.int64)
    mask[label == IGNORE] = IGNORE
    return mask


class EpisodeDataset(Dataset):
    """Loads the images and labels of fixed episodes and applies the evaluation transform."""

    def __init__(self, episodes: list[Episode], data_root: str, data_set: str, split: int,
                 use_split_coco: bool, val_size: int):
        self.episodes = episodes
        self.data_root = str(data_root)
        self.val_size = val_size
        self.num_classes = num_classes(data_set)
        self.novel = novel_classes(data_set, split, use_split_coco)
        self.lut = base_label_lut(data_set, split, use_split_coco)
        for i, e in enumerate(episodes):
            if e.class_id not in self.novel:
                raise ValueError(f"episode {i}: class {e.class_id} is not a novel class of "
                                 f"{data_set} fold {split} {self.novel}")
        self._check_files()

    def _check_files(self) -> None:
        """Fail before any episode runs when a listed image or label is missing."""
        seen: set[str] = set()
        for i, e in enumerate(self.episodes):
            for path in (p for pair in (e.query, *e.supports) for p in pair):
                if path not in seen:
                    seen.add(path)
                    if not os.path.isfile(os.path.join(self.data_root, path)):
                        raise FileNotFoundError(f"episode {i}: {os.path.join(self.data_root, path)} does not exist")

    def __len__(self) -> int:
        return len(self.episodes)

    def _read_pair(self, pair: Pair) -> tuple[np.ndarray, np.ndarray]:
        image_path, label_path = (os.path.join(self.data_root, p) for p in pair)
        image, label = read_image(image_path), read_label(label_path)
        if image.shape[:2] != label.shape:
            raise ValueError(f"image {image_path} is {image.shape[:2]} but label {label_path} "
                             f"is {label.shape}")
        bad = np.setdiff1d(np.unique(label), [*range(self.num_classes + 1), IGNORE])
        if bad.size:
            raise ValueError(f"label {label_path} holds values {bad.tolist()} outside "
                             f"0..{self.num_classes} and {IGNORE}")
        return image, label

    def __getitem__(self, i: int) -> dict:
        episode = self.episodes[i]
        size, c = self.val_size, episode.class_id
        image, label = self._read_pair(episode.query)
        query_mask = binary_mask(label, c)
        query_base = self.lut[label].astype(np.int64)
        support_imgs, support_masks = [], []
        for pair in episode.supports:  # already in model order
            s_image, s_label = self._read_pair(pair)
            support_imgs.append(transform_image(s_image, size))
            support_masks.append(transform_label(binary_mask(s_label, c), size))
        return {
            "query_img": transform_image(image, size),
            "query_mask": transform_label(query_mask, size),
            "query_mask_base": transform_label(query_base, size),
            "support_imgs": torch.stack(support_imgs),
            "support_masks": torch.stack(support_masks),
            "padding": padding_map(label.shape[0], label.shape[1], size),
            "query_mask_orig": torch.from_numpy(query_mask),
            "query_base_orig": torch.from_numpy(query_base),
            "class_id": c,
            "class_idx": self.novel.index(c),
            "episode_idx": i,
            "query_name": episode.query[0],
            "support_names": [s[0] for s in episode.supports],
        }


def _resolve(path: str | None) -> Path | None:
    """Config path: relative paths are relative to the repository root."""
    if not path:
        return None
    p = Path(path)
    return p if p.is_absolute() else REPO_ROOT / p


def _relative(pairs: list[Pair], root: Path) -> list[Pair]:
    """Paths relative to data_root, so that episode files are portable."""
    return [tuple(os.path.relpath(os.path.abspath(p), root) for p in pair) for pair in pairs]


def _check_loaded(episodes: list[Episode], path: Path, shot: int, novel: list[int]) -> None:
    for i, e in enumerate(episodes):
        if len(e.supports) != shot:
            raise ValueError(f"episode file {path}: episode {i} has {len(e.supports)} supports "
                             f"but the config asks for shot={shot}")
        if e.class_id not in novel:
            raise ValueError(f"episode file {path}: episode {i} uses class {e.class_id}, not a "
                             f"novel class of this fold {novel}")


def build_episode_dataset(cfg, seed: int) -> tuple[EpisodeDataset, list[Episode]]:
    """Episode list and dataset for one evaluation seed, from the config.

    Reads ``{lists_root}/{data_set}/fss_list/val/{data_list,sub_class_file_list}_{split}.txt``;
    without them, regenerates both from ``cfg.val_list`` with the 2,048-pixel rule. With
    ``cfg.episode_file`` set to an existing file (``{seed}`` in its name is replaced by the
    seed), the episodes are loaded from it instead of drawn.
    """
    data_set, split, shot = cfg.data_set, cfg.split, cfg.shot
    use_split_coco = bool(getattr(cfg, "use_split_coco", False))
    novel = novel_classes(data_set, split, use_split_coco)
    data_root = _resolve(cfg.data_root)
    if data_root is None or not data_root.is_dir():
        raise FileNotFoundError(f"data_root not found: {data_root or cfg.data_root!r}")
    root = data_root.resolve()

    episode_file = _resolve(str(getattr(cfg, "episode_file", None) or "")
                            .replace("{seed}", str(seed)))
    if episode_file is not None and episode_file.is_file():
        episodes, _ = load_episodes(str(episode_file))
        _check_loaded(episodes, episode_file, shot, novel)
        log.info("loaded %d episodes from %s", len(episodes), episode_file)
    else:
        if episode_file is not None:
            log.info("episode file %s not found; drawing episodes with seed %d",
                     episode_file, seed)
        lists_root = _resolve(getattr(cfg, "lists_root", None) or "lists")
        fss_dir = lists_root / data_set / "fss_list" / "val"
        data_path = fss_dir / f"data_list_{split}.txt"
        sub_path = fss_dir / f"sub_class_file_list_{split}.txt"
        val_list = _resolve(getattr(cfg, "val_list", None))
        if data_path.is_file() and sub_path.is_file():
            data_list = read_data_list(str(data_path), str(root))
            sub_lists = read_sub_class_file_list(str(sub_path), str(root))
        elif val_list is not None and val_list.is_file():
            log.info("%s not found; building the fold-%d lists from %s (2,048-pixel rule)",
                     data_path, split, val_list)
            data_list, sub_lists = build_fss_lists(read_data_list(str(val_list), str(root)),
                                                   novel, "val")
        else:
            raise FileNotFoundError(f"neither the few-shot lists {data_path} and {sub_path} nor "
                                    f"the plain val_list {val_list} exist")
        sub_lists = {c: _relative(pairs, root) for c, pairs in sub_lists.items()}
        episodes = make_episodes(_relative(data_list, root), sub_lists, novel, shot,
                                 cfg.test_num, seed,
                                 label_reader=lambda p: read_label(os.path.join(root, p)))
    dataset = EpisodeDataset(episodes, str(root), data_set, split, use_split_coco, cfg.val_size)
    return dataset, episodes
