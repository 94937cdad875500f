"""Few-shot test episodes as a torch Dataset, and building them from a config.

Every item is a named dict (see EpisodeDataset.__getitem__). The episode list is fixed before
the dataset exists (dataset/episodes.py), so items do not depend on DataLoader workers. Base
labels are computed on the fly with the base-annotation lookup table instead of read from
``base_annotation/`` PNGs (identical values, see dataset/get_mulway_base_data.py).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset

from dataset.episodes import Episode, load_episodes, make_episodes
from dataset.hsnet_episodes import hsnet_episodes
from dataset.images import read_image
from dataset.lists import (Pair, build_fss_lists, fss_list_files, read_data_list, read_label,
                           read_sub_class_file_list)
from dataset.splits import base_label_lut, novel_classes, num_classes
from dataset.transforms import (padding_map, resized_hw, squash_image, squash_label, transform_image,
                                transform_label)
from model.contract import IGNORE
from util.errors import DataError
from util.paths import repo_path

GEOMETRIES = ("pad", "squash")  # BAM/MSANet's, HSNet's (dataset/transforms.py)
DEFAULT_LISTS_ROOT = "lists"  # SCHEMA's lists_root: without its files the plain val_list is used
log = logging.getLogger(__name__)
def binary_mask(label: np.ndarray, class_id: int) -> np.ndarray:
    """int64 mask: class_id -> 1, void 255 stays 255, everything else -> 0."""
    mask = (label == class_id).astype(np.int64)
    mask[label == IGNORE] = IGNORE
    return mask


class EpisodeDataset(Dataset):
    """Loads the images and labels of fixed episodes and applies the evaluation transform."""

    def __init__(self, episodes: list[Episode], data_root: str, data_set: str, split: int,
                 use_split_coco: bool, val_size: int, geometry: str = "pad"):
        if geometry not in GEOMETRIES:
            raise ValueError(f"geometry must be one of {GEOMETRIES}, got {geometry!r}")
        self.episodes = episodes
        self.data_root = str(data_root)
        self.val_size = val_size
        self.geometry = geometry
        self.num_classes = num_classes(data_set)
        self.novel = novel_classes(data_set, split, use_split_coco)
        self.lut = base_label_lut(data_set, split, use_split_coco)
        for i, e in enumerate(episodes):
            if e.class_id not in self.novel:
                raise DataError(f"episode {i}: class {e.class_id} is not a novel class of "
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
        self._check_label(label, image.shape[:2], image_path, label_path)
        try:
            resized_hw(*label.shape, self.val_size)
        except DataError as err:
            raise DataError(f"{image_path}: {err}") from None
        return image, label

    def _read_pil_pair(self, pair: Pair) -> tuple[Image.Image, np.ndarray]:
        """The image decoded by PIL, as HSNet reads it (its JPEG decoder is not cv2's), and the label."""
        image_path, label_path = (os.path.join(self.data_root, p) for p in pair)
        with Image.open(image_path) as opened:
            image = opened.convert("RGB")
        label = read_label(label_path)
        self._check_label(label, (image.height, image.width), image_path, label_path)
        return image, label

    def _check_label(self, label: np.ndarray, image_hw: tuple[int, int], image_path: str, label_path: str) -> None:
        if tuple(image_hw) != label.shape:
            raise DataError(f"image {image_path} is {tuple(image_hw)} but label {label_path} "
                            f"is {label.shape}")
        bad = np.setdiff1d(np.unique(label), [*range(self.num_classes + 1), IGNORE])
        if bad.size:
            raise DataError(f"label {label_path} holds values {bad.tolist()} outside "
                            f"0..{self.num_classes} and {IGNORE}")

    def __getitem__(self, i: int) -> dict:
        episode = self.episodes[i]
        size, c = self.val_size, episode.class_id
        squash = self.geometry == "squash"
        read = self._read_pil_pair if squash else self._read_pair
        image_at, label_at = (squash_image, squash_label) if squash else (transform_image, transform_label)
        image, label = read(episode.query)
        if squash:  # HSNet's labels, and so its metrics, are at the canvas size
            label = squash_label(label, size).numpy()
        query_mask = binary_mask(label, c)
        query_base = self.lut[label].astype(np.int64)
        support_imgs, support_masks = [], []
        for pair in episode.supports:  # already in model order
            s_image, s_label = read(pair)
            support_imgs.append(image_at(s_image, size))
            support_masks.append(label_at(binary_mask(s_label, c), size))
        padding = torch.zeros(size, size, dtype=torch.bool) if squash else padding_map(*label.shape, size)
        return {
            "query_img": image_at(image, size),
            "query_mask": label_at(query_mask, size),
            "query_mask_base": label_at(query_base, size),
            "support_imgs": torch.stack(support_imgs),
            "support_masks": torch.stack(support_masks),
            "padding": padding,
            "query_mask_orig": torch.from_numpy(query_mask),
            "query_base_orig": torch.from_numpy(query_base),
            "class_id": c,
            "class_idx": self.novel.index(c),
            "episode_idx": i,
            "query_name": episode.query[0],
            "support_names": [s[0] for s in episode.supports],
        }


def _resolve(path: str | None) -> Path | None:
    """A config path that may be unset (None or empty)."""
    return repo_path(path) if path else None


def _relative(pairs: list[Pair], root: Path) -> list[Pair]:
    """Paths relative to data_root, so that episode files are portable."""
    return [tuple(os.path.relpath(os.path.abspath(p), root) for p in pair) for pair in pairs]


def _check_loaded(episodes: list[Episode], path: Path, shot: int, novel: list[int], test_num: int,
                  root: Path) -> None:
    """An episode list read from a file must be the run the config describes, episode by
    episode: as many episodes as ``test_num``, ``shot`` supports, a novel class that is in the
    labels of the query and of every support, no support that is the query image."""
    if len(episodes) != test_num:
        raise DataError(f"episode file {path} holds {len(episodes)} episodes but the config asks for "
                        f"test_num={test_num}: set test_num {len(episodes)} or use another file")
    classes_of: dict[str, set[int]] = {}  # query label -> its classes, each label read once
    for i, e in enumerate(episodes):
        if len(e.supports) != shot:
            raise DataError(f"episode file {path}: episode {i} has {len(e.supports)} supports "
                            f"but the config asks for shot={shot}")
        if e.class_id not in novel:
            raise DataError(f"episode file {path}: episode {i} uses class {e.class_id}, not a "
                            f"novel class of this fold {novel}")
        if any(os.path.normpath(s[0]) == os.path.normpath(e.query[0]) for s in e.supports):
            raise DataError(f"episode file {path}: episode {i} uses its query image {e.query[0]} as a support")
        for role, (_, label) in [("query", e.query)] + [(f"support {k}", s) for k, s in enumerate(e.supports)]:
            if label not in classes_of:
                label_path = os.path.join(root, label)
                if not os.path.isfile(label_path):
                    raise FileNotFoundError(f"episode file {path}: episode {i}: {label_path} does not exist")
                classes_of[label] = set(np.unique(read_label(label_path)).tolist())
            if e.class_id not in classes_of[label]:
                raise DataError(f"episode file {path}: episode {i} segments class {e.class_id}, which is absent "
                                f"from its {role} label {label}")


def episode_file_path(cfg, seed: int) -> Path | None:
    """``cfg.episode_file`` with ``{seed}`` replaced, against the repository root; None if unset."""
    return _resolve(str(getattr(cfg, "episode_file", None) or "").replace("{seed}", str(seed)))


def build_episode_dataset(cfg, seed: int) -> tuple[EpisodeDataset, list[Episode]]:
    """Episode list and dataset for one evaluation seed, from the config.

    Reads ``{lists_root}/{data_set}/fss_list/val/{data_list,sub_class_file_list}_{split}.txt``;
    without them, and only for the default ``lists_root`` (``lists``) or an empty one (no lists
    wanted), regenerates both from ``cfg.val_list`` with the 2,048-pixel rule. Any other
    ``lists_root`` must hold the files: another list rule is another benchmark. With ``cfg.episode_file`` set
    (``{seed}`` in its name is replaced by the seed), the episodes are loaded from that file,
    which must exist and match the config (``_check_loaded``). With ``cfg.hsnet_list`` set
    (``{split}`` replaced by the fold), they are HSNet's episodes (dataset/hsnet_episodes.py).
    """
    data_set, split, shot = cfg.data_set, cfg.split, cfg.shot
    use_split_coco = bool(getattr(cfg, "use_split_coco", False))
    novel = novel_classes(data_set, split, use_split_coco)
    data_root = _resolve(cfg.data_root)
    if data_root is None or not data_root.is_dir():
        raise FileNotFoundError(f"data_root not found: {data_root or cfg.data_root!r}")
    root = data_root.resolve()

    episode_file = episode_file_path(cfg, seed)
    if episode_file is not None:
        if not episode_file.is_file():
            raise FileNotFoundError(f"episode_file {episode_file} (seed {seed}) does not exist: fix the path "
                                    "or unset episode_file to draw episodes")
        episodes, _ = load_episodes(str(episode_file))
        _check_loaded(episodes, episode_file, shot, novel, cfg.test_num, root)
        log.info("loaded %d episodes from %s", len(episodes), episode_file)
    elif getattr(cfg, "hsnet_list", ""):
        path = repo_path(cfg.hsnet_list.format(split=split))
        episodes = hsnet_episodes(path, data_set, novel, shot, cfg.test_num)
        log.info("drew %d episodes from HSNet's list %s as its test does", len(episodes), path)
    else:
        given = str(getattr(cfg, "lists_root", None) or "")
        lists_root = _resolve(given or DEFAULT_LISTS_ROOT)
        data_path, sub_path = fss_list_files(lists_root, data_set, "val", split)
        val_list = _resolve(getattr(cfg, "val_list", None))
        if given and data_path.is_file() and sub_path.is_file():
            data_list = read_data_list(str(data_path), str(root))
            sub_lists = read_sub_class_file_list(str(sub_path), str(root))
        elif given not in ("", DEFAULT_LISTS_ROOT):
            missing = data_path if not data_path.is_file() else sub_path
            raise FileNotFoundError(f"lists_root {given!r} was given but {missing} does not exist: fix lists_root, "
                                    f"or remove it to regenerate the lists from val_list")
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
    dataset = EpisodeDataset(episodes, str(root), data_set, split, use_split_coco, cfg.val_size,
                             getattr(cfg, "geometry", "pad"))
    return dataset, episodes


def episode_loader(dataset: EpisodeDataset, indices: list[int], workers: int, device: torch.device) -> DataLoader:
    """The episodes ``indices`` of ``dataset`` in order, one at a time (``batch_size=None``),
    loaded by ``workers`` processes ahead of the engine; pinned memory for CUDA copies."""
    return DataLoader(Subset(dataset, indices), batch_size=None, shuffle=False, num_workers=workers,
                      pin_memory=device.type == "cuda")


def to_device(episode: dict, device: torch.device) -> dict:
    """A loader's episode as a batch of one (the batch axis added) with its tensors on ``device``."""
    return {k: v.unsqueeze(0).to(device) if torch.is_tensor(v) else v for k, v in episode.items()}
