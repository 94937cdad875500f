"""Write base annotations: each label with base classes renumbered 1..B and novel classes 0.

Same files as BAM's ``dataset/get_mulway_base_data.py`` (single-channel PNG, same basename, 0 and
255 kept), computed with one lookup table per fold instead of a per-class loop. The evaluation
loader does not need these files (it applies the same table on the fly); they are for tools
that expect BAM's ``data/base_annotation/{dataset}/{mode}/{split}/`` folders.

    python -m dataset.get_mulway_base_data --data-set pascal --data-root data/VOCdevkit2012/VOC2012 \\
        --list lists/pascal/fss_list/val/data_list_0.txt --split 0 \\
        --out data/base_annotation/pascal/val/0
"""
from __future__ import annotations

import argparse
import os

import cv2
import numpy as np

from util.errors import user_errors
from dataset.lists import Pair, read_data_list, read_label
from dataset.splits import base_label_lut


def write_base_annotations(pairs: list[Pair], out_dir: str, lut: np.ndarray) -> int:
    """Map every label of ``pairs`` through ``lut`` into ``out_dir``; returns the file count."""
    os.makedirs(out_dir, exist_ok=True)
    for _, label_path in pairs:
        out_path = os.path.join(out_dir, os.path.basename(label_path))
        if not cv2.imwrite(out_path, lut[read_label(label_path)]):
            raise OSError(f"cannot write {out_path}")
    return len(pairs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-set", required=True, choices=["pascal", "coco", "demo"])
    parser.add_argument("--data-root", required=True, help="folder the list paths refer to")
    parser.add_argument("--list", required=True, help="data list (BAM fss_list or plain)")
    parser.add_argument("--split", required=True, type=int, choices=range(4))
    parser.add_argument("--use-split-coco", action="store_true",
                        help="COCO interleaved split (used by all released COCO models)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an input error")
    args = parser.parse_args(argv)
    with user_errors("dataset/get_mulway_base_data.py", args.debug):
        lut = base_label_lut(args.data_set, args.split, args.use_split_coco)
        count = write_base_annotations(read_data_list(args.list, args.data_root), args.out, lut)
    print(f"wrote {count} base annotations to {args.out}")


if __name__ == "__main__":
    main()
