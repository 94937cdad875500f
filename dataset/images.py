"""Reading image files, and a list's images and labels in the evaluation geometry (training)."""
from __future__ import annotations

import os

import cv2
import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from dataset.lists import Pair, read_label
from dataset.transforms import transform_image, transform_label
from util.errors import DataError

# OpenCV's own thread pool: one image at a time needs none (loader workers give the parallelism),
# it would compete with the engine's threads, and a pool started in the main process leaves
# forked loader workers hanging in their first resize.
cv2.setNumThreads(1)
JPEG_START, JPEG_END = b"\xff\xd8", b"\xff\xd9"


def _jpeg_truncated(data: bytes, path: str) -> bool:
    """Whether a JPEG file was cut short. libjpeg decodes a truncated file anyway (the lost
    rows grey) with only a warning, so a cut file would silently change the numbers. A complete
    file ends with the end-of-image marker; for the rare file with bytes after it, PIL's
    decoder, which raises on a truncated stream, decides."""
    if not data.startswith(JPEG_START) or data.rstrip(b"\x00\r\n ")[-2:] == JPEG_END:
        return False
    try:
        with Image.open(path) as im:
            im.load()
    except (OSError, SyntaxError, ValueError):
        return True
    return False


def read_image(path: str) -> np.ndarray:
    """Image file as float32 HxWx3 RGB (decoded with cv2 like the reference); a truncated or
    undecodable file raises DataError naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    with open(path, "rb") as f:
        data = f.read()
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
    if image is None:
        raise DataError(f"cannot decode image file {path} (empty, truncated or not an image)")
    if _jpeg_truncated(data, path):
        raise DataError(f"image file {path} is truncated (a JPEG cut short): replace it with a complete copy")
    return np.float32(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))


class ImageSet(Dataset):
    """Images and labels of a list in the evaluation geometry: ([3,S,S] float, [S,S] uint8 ids)."""

    def __init__(self, pairs: list[Pair], size: int):
        self.pairs, self.size = pairs, size

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        image, label = read_image(self.pairs[i][0]), read_label(self.pairs[i][1])
        if image.shape[:2] != label.shape:
            raise DataError(f"image {self.pairs[i][0]} is {image.shape[:2]} but its label is {label.shape}")
        return transform_image(image, self.size), transform_label(label, self.size).to(torch.uint8)
