"""Evaluation geometries: BAM/MSANet/EFTNet's (``pad``, the default) and HSNet's (``squash``).

``pad`` (their ``Resize`` for ``resized_val: True``): the longer side is scaled to ``size`` and
the other one in proportion (truncated), then both are floored to a multiple of 8 (473 -> 472).
The result is pasted into the top-left corner of a ``size`` x ``size`` canvas: image padding 0
before normalisation, label padding 255. The arithmetic and dtypes follow the reference so that
tensors match it bit for bit.

``squash`` (HSNet's test transform): the image, decoded by PIL, is resized to ``size`` x
``size`` by PIL's bilinear filter, scaled to 0..1 and normalised; the label is resized to the
same size by nearest neighbour (``F.interpolate``), with no padding, and the metrics are taken
at that size.
"""
from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from util.errors import DataError
from model.contract import IGNORE

# ImageNet statistics of RGB images on the 0..1 scale, and on the 0..255 scale of ``pad``.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
MEAN = [m * 255 for m in IMAGENET_MEAN]
STD = [s * 255 for s in IMAGENET_STD]


def resized_hw(h: int, w: int, size: int) -> tuple[int, int]:
    """(new_h, new_w) of an h x w image: longer side -> size, then floored to a multiple of 8."""
    if h >= w:
        new_h, new_w = size, int(w * (size * 1.0 / h))
    else:
        new_h, new_w = int(h * (size * 1.0 / w)), size
    new_h, new_w = new_h // 8 * 8, new_w // 8 * 8
    if new_h == 0 or new_w == 0:
        raise DataError(f"an image of {h}x{w} pixels becomes empty when resized to {size}")
    return new_h, new_w


def transform_image(image: np.ndarray, size: int) -> torch.Tensor:
    """RGB float32 HxWx3 image -> normalised float32 [3, size, size] on the padded canvas."""
    new_h, new_w = resized_hw(image.shape[0], image.shape[1], size)
    canvas = np.zeros((size, size, 3), np.float32)
    canvas[:new_h, :new_w] = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    tensor = torch.from_numpy(canvas.transpose(2, 0, 1).copy())
    # Channel by channel with Python scalars, exactly as the reference normalises.
    for channel, m, s in zip(tensor, MEAN, STD):
        channel.sub_(m).div_(s)
    return tensor


def transform_label(label: np.ndarray, size: int) -> torch.Tensor:
    """HxW label -> int64 [size, size], nearest resize, padding 255."""
    new_h, new_w = resized_hw(label.shape[0], label.shape[1], size)
    canvas = np.full((size, size), IGNORE, np.int64)
    # The reference resizes labels as float32; nearest neighbour keeps the values exact.
    canvas[:new_h, :new_w] = cv2.resize(label.astype(np.float32), (new_w, new_h),
                                        interpolation=cv2.INTER_NEAREST)
    return torch.from_numpy(canvas)


def padding_map(h: int, w: int, size: int) -> torch.Tensor:
    """Bool [size, size], True on the padded canvas outside the resized h x w image."""
    new_h, new_w = resized_hw(h, w, size)
    pad = torch.ones(size, size, dtype=torch.bool)
    pad[:new_h, :new_w] = False
    return pad


def squash_image(image: Image.Image, size: int) -> torch.Tensor:
    """A PIL RGB image -> normalised float32 [3, size, size], as HSNet's Resize, ToTensor and
    Normalize compute it."""
    resized = np.asarray(image.resize((size, size), Image.BILINEAR))
    tensor = torch.from_numpy(resized.copy()).permute(2, 0, 1).float().div(255)
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    return tensor.sub_(mean[:, None, None]).div_(std[:, None, None])


def squash_label(label: np.ndarray, size: int) -> torch.Tensor:
    """HxW label -> int64 [size, size] by nearest neighbour, as HSNet resizes its masks."""
    resized = F.interpolate(torch.from_numpy(label.astype(np.float32))[None, None], (size, size), mode="nearest")
    return resized[0, 0].long()
