"""Few-shot list files: reading BAM/PFENet lists, regenerating them, reading labels.

Two formats exist (docs/reference_behaviour.md, section 1.2):

* a data list: one ``image_path label_path`` pair per line;
* a sub-class file list: the Python repr of ``{class_id: [(image_path, label_path), ...]}``.

The released BAM lists carry paths from the authors' machine (``../data/VOCdevkit2012/...``).
Instead of requiring that layout, the leading part of the first entry that has to be replaced
by ``data_root`` for the file to exist is detected once and applied to every entry. Plain lists
relative to ``data_root`` (``JPEGImages/x.jpg SegmentationClassAug/x.png``) need no rewrite.
Returned paths are joined with ``data_root``.
"""
from __future__ import annotations

import ast
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from model.contract import IGNORE
from util.errors import DataError

Pair = tuple[str, str]
MIN_PIXELS = 2 * 32 * 32  # PFENet/BAM: a class counts only if it covers this many pixels


def read_label(path: str) -> np.ndarray:
    """Label PNG as uint8 HxW class ids.

    Reads single-channel PNGs (SegmentationClassAug, COCO) and VOC palette PNGs alike: PIL
    returns the palette indices, which are the class ids (a grayscale conversion would turn
    the palette colours into luminance values).
    """
    try:
        with Image.open(path) as im:
            mode = im.mode
            label = np.array(im)
    except FileNotFoundError:
        raise FileNotFoundError(f"label file not found: {path}") from None
    except (OSError, SyntaxError, ValueError) as e:  # PIL: truncated or broken files
        raise DataError(f"cannot read label file {path} (truncated or not an image?): {e}") from None
    if mode not in ("L", "P"):
        raise DataError(f"label file {path} has image mode {mode!r}; expected a single-channel "
                         "('L') or palette ('P') PNG holding class ids")
    return label


def _detect_prefix(path: str, data_root: str) -> str | None:
    """Leading part of ``path`` to drop so that ``data_root/<rest>`` exists; None if none."""
    if os.path.isfile(os.path.join(data_root, path)):
        return ""
    parts = path.split("/")
    for k in range(1, len(parts)):
        if os.path.isfile(os.path.join(data_root, *parts[k:])):
            return "/".join(parts[:k]) + "/"
    return None


class _Resolver:
    """Rewrites list paths against data_root with prefixes detected on the first pair."""

    def __init__(self, data_root: str, source: str):
        self.data_root = data_root
        self.source = source
        self.prefixes: list[str] | None = None

    def __call__(self, pair: Iterable[str], where: str) -> Pair:
        pair = tuple(pair)
        if self.prefixes is None:
            self.prefixes = []
            for path in pair:
                prefix = _detect_prefix(path, self.data_root)
                if prefix is None:
                    raise FileNotFoundError(
                        f"{self.source}, {where}: {path} not found under data_root "
                        f"{self.data_root}, neither as is nor with a leading part of the path "
                        "replaced by data_root")
                self.prefixes.append(prefix)
        out = []
        for path, prefix in zip(pair, self.prefixes):
            if not path.startswith(prefix):
                raise DataError(f"{self.source}, {where}: {path} does not start with "
                                 f"{prefix!r} like the first entry of the list")
            full = os.path.normpath(os.path.join(self.data_root, path[len(prefix):]))
            if not os.path.isfile(full):
                raise FileNotFoundError(f"{self.source}, {where}: file not found: {full}")
            out.append(full)
        return out[0], out[1]


def _check_list_file(path: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"list file not found: {path}")


def read_data_list(path: str, data_root: str) -> list[Pair]:
    """(image, label) pairs of a data list, resolved against data_root (see module doc)."""
    _check_list_file(path)
    resolve = _Resolver(data_root, f"list {path}")
    pairs = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2:
                raise DataError(f"list {path}, line {n}: expected 'image_path label_path', "
                                 f"got {line.strip()!r}")
            pairs.append(resolve(fields, f"line {n}"))
    return pairs


def read_sub_class_file_list(path: str, data_root: str) -> dict[int, list[Pair]]:
    """The ``{class_id: [(image, label), ...]}`` file, parsed safely, paths resolved."""
    _check_list_file(path)
    with open(path) as f:
        text = f.read()
    try:
        raw = ast.literal_eval(text)
    except (ValueError, SyntaxError) as e:
        raise DataError(f"sub-class file list {path} is not a Python dict literal: {e}") from None
    if not isinstance(raw, dict):
        raise DataError(f"sub-class file list {path}: expected a dict, got {type(raw).__name__}")
    resolve = _Resolver(data_root, f"sub-class file list {path}")
    out: dict[int, list[Pair]] = {}
    for c, entries in raw.items():
        if not isinstance(c, int) or not isinstance(entries, (list, tuple)):
            raise DataError(f"sub-class file list {path}: expected int class ids mapped to "
                             f"lists, got key {c!r} -> {type(entries).__name__}")
        out[c] = []
        for j, e in enumerate(entries):
            if not (isinstance(e, (list, tuple)) and len(e) == 2
                    and all(isinstance(p, str) for p in e)):
                raise DataError(f"sub-class file list {path}, class {c} entry {j}: expected "
                                 f"an (image_path, label_path) pair, got {e!r}")
            out[c].append(resolve(e, f"class {c} entry {j}"))
    return out


def build_fss_lists(pairs: list[Pair], classes: list[int], mode: str,
                    min_pixels: int = MIN_PIXELS,
                    label_reader: Callable[[str], np.ndarray] = read_label,
                    ) -> tuple[list[Pair], dict[int, list[Pair]]]:
    """Regenerate the BAM data list and sub-class file list from a plain list.

    A class of an image qualifies if it is in ``classes`` and covers >= ``min_pixels``
    pixels. ``mode='val'`` (``classes`` = the fold's novel classes): keep an image if at least
    one class qualifies. ``mode='train'`` (``classes`` = the base classes): BAM's filter, which
    in addition drops every image holding any class outside ``classes``.
    """
    if mode not in ("train", "val"):
        raise ValueError(f"mode must be 'train' or 'val', got {mode!r}")
    wanted = set(classes)
    data_list: list[Pair] = []
    sub_class_file_list: dict[int, list[Pair]] = {c: [] for c in classes}
    for pair in pairs:
        counts = np.bincount(label_reader(pair[1]).ravel(), minlength=256)
        present = {c for c in np.flatnonzero(counts).tolist() if c not in (0, IGNORE)}
        if mode == "train" and not present <= wanted:
            continue
        qualifying = sorted(c for c in present & wanted if counts[c] >= min_pixels)
        if qualifying:
            data_list.append(pair)
            for c in qualifying:
                sub_class_file_list[c].append(pair)
    return data_list, sub_class_file_list


def fss_list_files(lists_root: str | Path, data_set: str, part: str, split: int) -> tuple[Path, Path]:
    """BAM's list files of a fold: ``{lists_root}/{data_set}/fss_list/{part}/`` holds
    ``data_list_{split}.txt`` and ``sub_class_file_list_{split}.txt`` (``part``: train or val)."""
    folder = Path(lists_root) / data_set / "fss_list" / part
    return folder / f"data_list_{split}.txt", folder / f"sub_class_file_list_{split}.txt"


def write_fss_lists(files: tuple[Path, Path], data_list: list[Pair],
                    sub_class_file_list: dict[int, list[Pair]], data_root: str) -> None:
    """Write a data list and a sub-class file list (BAM format) to ``files`` (as returned by
    fss_list_files).

    Paths (as returned by read_data_list / build_fss_lists) are written relative to
    data_root, so the files read back unchanged with read_data_list(..., data_root).
    """
    root = os.path.abspath(data_root)

    def rel(pair: Pair) -> Pair:
        return tuple(os.path.relpath(os.path.abspath(p), root) for p in pair)

    data_path, sub_path = files
    data_path.parent.mkdir(parents=True, exist_ok=True)
    data_path.write_text("".join(" ".join(rel(p)) + "\n" for p in data_list))
    sub = {c: [rel(p) for p in entries] for c, entries in sub_class_file_list.items()}
    sub_path.parent.mkdir(parents=True, exist_ok=True)
    sub_path.write_text(repr(sub))
