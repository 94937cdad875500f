"""Class folds of PASCAL-5i, COCO-20i and the embedded demo benchmark.

Class ids are the label values (1..20 or 1..80; 0 is background, 255 void). Each of the four
folds holds out a set of novel classes; the remaining base classes, in ascending order,
define the base learner's output channels and the values of the base annotations.
"""
from __future__ import annotations

import numpy as np

_NUM_CLASSES = {"pascal": 20, "coco": 80, "demo": 20}
NUM_FOLDS = 4


def num_classes(data_set: str) -> int:
    """Number of object classes (background and void excluded)."""
    if data_set not in _NUM_CLASSES:
        raise ValueError(f"data_set must be one of {sorted(_NUM_CLASSES)}, got {data_set!r}")
    return _NUM_CLASSES[data_set]


def novel_classes(data_set: str, split: int, use_split_coco: bool = False) -> list[int]:
    """Novel (test) class ids of a fold, ascending.

    PASCAL and demo: fold i holds out 5i+1..5i+5. COCO with ``use_split_coco`` (the
    interleaved split of every released BAM/MSANet/EFTNet COCO model): i+1, i+5, ..., i+77;
    without it, the contiguous PANet split 20i+1..20i+20.
    """
    n = num_classes(data_set)
    if isinstance(split, bool) or not isinstance(split, (int, np.integer)) \
            or not 0 <= split < NUM_FOLDS:
        raise ValueError(f"split must be an integer in 0..{NUM_FOLDS - 1}, got {split!r}")
    split = int(split)
    if data_set == "coco" and use_split_coco:
        return list(range(split + 1, n + 1, NUM_FOLDS))
    per_fold = n // NUM_FOLDS
    return list(range(per_fold * split + 1, per_fold * (split + 1) + 1))


def base_classes(data_set: str, split: int, use_split_coco: bool = False) -> list[int]:
    """Base (training) class ids of a fold: all classes that are not novel, ascending."""
    novel = set(novel_classes(data_set, split, use_split_coco))
    return [c for c in range(1, num_classes(data_set) + 1) if c not in novel]


def base_label_lut(data_set: str, split: int, use_split_coco: bool = False) -> np.ndarray:
    """256-entry uint8 lookup table turning a label into its base annotation.

    0 -> 0, 255 -> 255, base class -> its 1-based rank among the base classes, novel class
    -> 0. Values above num_classes (invalid labels) map to themselves, as in the reference
    script, so that label validation still sees and rejects them.
    """
    lut = np.arange(256, dtype=np.uint8)
    lut[1:num_classes(data_set) + 1] = 0
    base = base_classes(data_set, split, use_split_coco)
    lut[base] = np.arange(1, len(base) + 1, dtype=np.uint8)
    return lut
