"""Synthetic few-shot episodes for the model tests: smooth noise with a bright box as the foreground."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

SIZE = 65  # image side: 9x9 maps at stride 8, fast on one thread


def make_episode(seed: int, batch: int, shot: int, size: int = SIZE) -> tuple[Tensor, Tensor, Tensor]:
    """Smooth noise images, each support with a bright textured box as its foreground (1),
    the last rows ignored (255). Returns query [B,3,S,S], supports [B,K,3,S,S], masks [B,K,S,S]."""
    g = torch.Generator().manual_seed(seed)

    def images(n: int) -> Tensor:
        return F.avg_pool2d(torch.randn(n, 3, size + 6, size + 6, generator=g), 7, 1) * 3

    query, supports = images(batch), images(batch * shot)
    masks = torch.zeros(batch * shot, size, size, dtype=torch.long)
    side = size // 2
    for i in range(batch * shot):
        y, x = (int(v) for v in torch.randint(0, size - side, (2,), generator=g))
        supports[i, :, y:y + side, x:x + side] += torch.tensor([2.0, -1.0, 1.0]).view(3, 1, 1)
        masks[i, y:y + side, x:x + side] = 1
    masks[:, -4:] = 255
    return query, supports.view(batch, shot, 3, size, size), masks.view(batch, shot, size, size)
