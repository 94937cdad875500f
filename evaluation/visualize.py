"""Episode panels: supports, query, pseudo mask, base-model and EFTNet predictions side by side.

    python -m evaluation.visualize OUT.png PANEL.png...

stacks panels that meta_test.py wrote (``show`` / ``show_ft`` folders) into one picture, as the
README's.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

import cv2
import numpy as np
import torch

from dataset.transforms import MEAN, STD
from model.contract import IGNORE
from util.errors import DataError, user_errors

OUTLINE = (255, 40, 40)  # RGB
IGNORE_COLOUR = np.array([255, 255, 255], dtype=np.float32)


def to_rgb(image: torch.Tensor) -> np.ndarray:
    """Normalised [3,S,S] tensor -> uint8 HxWx3 RGB."""
    array = image.detach().cpu().float().numpy().transpose(1, 2, 0) * np.array(STD) + np.array(MEAN)
    return np.clip(array, 0, 255).astype(np.uint8)


def overlay(rgb: np.ndarray, mask: torch.Tensor) -> np.ndarray:
    """Foreground (1) kept bright with a red outline, the rest dimmed; ignore (255) whitened."""
    mask = mask.detach().cpu().numpy()
    out = rgb.astype(np.float32)
    out[mask != 1] *= 0.4
    out[mask == IGNORE] = 0.6 * out[mask == IGNORE] + 0.4 * IGNORE_COLOUR
    out = out.astype(np.uint8)
    contours, _ = cv2.findContours((mask == 1).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return cv2.drawContours(np.ascontiguousarray(out), contours, -1, OUTLINE, 1)


def _titled(tile: np.ndarray, title: str) -> np.ndarray:
    bar = np.full((18, tile.shape[1], 3), 255, np.uint8)
    cv2.putText(bar, title, (3, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([bar, tile], 0)


def episode_panel(batch: dict, base_final: torch.Tensor, eft_final: Optional[torch.Tensor] = None,
                  pseudo_mask: Optional[torch.Tensor] = None) -> np.ndarray:
    """One row: each support with its mask, the query with its label, the q2s pseudo mask,
    the base-model prediction and the EFTNet prediction (predictions are [1,2,S,S] outputs)."""
    query = to_rgb(batch["query_img"][0])
    tiles = [_titled(overlay(to_rgb(img), mask), f"support {k}")
             for k, (img, mask) in enumerate(zip(batch["support_imgs"][0], batch["support_masks"][0]))]
    tiles.append(_titled(overlay(query, batch["query_mask"][0]), "query label"))
    if pseudo_mask is not None:
        tiles.append(_titled(overlay(query, pseudo_mask[0].long()), "q2s pseudo mask"))
    tiles.append(_titled(overlay(query, base_final[0].argmax(0)), "base model"))
    if eft_final is not None:
        tiles.append(_titled(overlay(query, eft_final[0].argmax(0)), "EFTNet"))
    gap = np.full((tiles[0].shape[0], 4, 3), 255, np.uint8)
    return np.concatenate([part for tile in tiles for part in (tile, gap)][:-1], 1)


def stack(rows: list[np.ndarray]) -> np.ndarray:
    """Panels of equal width one above the other, with a white gap between them."""
    if len({row.shape[1] for row in rows}) > 1:
        raise DataError(f"panels of different widths {[row.shape[1] for row in rows]} (episodes with different shots?)")
    gap = np.full((6, rows[0].shape[1], 3), 255, np.uint8)
    return np.concatenate([part for row in rows for part in (row, gap)][:-1], 0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="the picture to write (PNG)")
    parser.add_argument("panels", nargs="+", help="episode panels written by meta_test.py")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an input error")
    args = parser.parse_args(argv)
    with user_errors("evaluation/visualize.py", args.debug):
        if Path(args.out).suffix.lower() != ".png":
            raise DataError(f"{args.out}: the picture is written as PNG, name it .png")
        rows = []
        for path in args.panels:
            row = cv2.imread(path)
            if row is None:
                raise DataError(f"{path}: not a readable image")
            rows.append(row)
        if not cv2.imwrite(args.out, stack(rows), [cv2.IMWRITE_PNG_COMPRESSION, 9]):  # half the default's size
            raise DataError(f"{args.out}: could not write the picture (does its folder exist?)")
        print(f"wrote {Path(args.out)}")


if __name__ == "__main__":
    main()
