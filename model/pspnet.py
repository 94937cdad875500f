"""PSPNet base learner: pyramid pooling (bins 1, 2, 3, 6) and classifier over the base classes.

Inside MSANet/BAM the two parts live on as ``learner_base = Sequential(ppm, cls)``; the
stand-alone :class:`PSPNet` (keys ``layer0..4``, ``ppm``, ``cls``) is what base training
writes as ``best.pth``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PPM_BINS = (1, 2, 3, 6)


class PPM(nn.Module):
    """Pyramid pooling: input concatenated with four pooled, reduced and re-upsampled copies."""

    def __init__(self, in_dim: int, reduction_dim: int, bins: tuple[int, ...] = PPM_BINS):
        super().__init__()
        self.features = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), nn.Conv2d(in_dim, reduction_dim, 1, bias=False),
                          nn.BatchNorm2d(reduction_dim), nn.ReLU(inplace=True))
            for b in bins)

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        pooled = [F.interpolate(f(x), size, mode="bilinear", align_corners=True) for f in self.features]
        return torch.cat([x, *pooled], 1)


def base_classifier(fea_dim: int, num_classes: int, width: int = 512) -> nn.Sequential:
    """3x3 conv -> BN -> ReLU -> Dropout2d(0.1) -> 1x1 conv (indices fixed by the releases)."""
    return nn.Sequential(nn.Conv2d(fea_dim * 2, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                         nn.ReLU(inplace=True), nn.Dropout2d(p=0.1), nn.Conv2d(width, num_classes, 1))


def base_learner(fea_dim: int, num_classes: int, width: int = 512) -> nn.Sequential:
    """``learner_base``: PPM then classifier, on the backbone's last stage."""
    return nn.Sequential(PPM(fea_dim, fea_dim // 4), base_classifier(fea_dim, num_classes, width))


def output_size(input_size: int, zoom_factor: int = 8) -> int:
    """The reference's output side: (S - 1) / 8 * zoom + 1 (S itself for zoom 8)."""
    return int((input_size - 1) / 8 * zoom_factor + 1)


class PSPNet(nn.Module):
    """Semantic segmentation over background + base classes, trained before meta-training."""

    def __init__(self, layers: list[nn.Module], fea_dim: int, num_classes: int, zoom_factor: int = 8,
                 width: int = 512):
        super().__init__()
        self.layer0, self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.ppm = PPM(fea_dim, fea_dim // 4)
        self.cls = base_classifier(fea_dim, num_classes, width)
        self.zoom_factor = zoom_factor

    def forward(self, x: Tensor) -> Tensor:
        feat = x
        for stage in (self.layer0, self.layer1, self.layer2, self.layer3, self.layer4):
            feat = stage(feat)
        logits = self.cls(self.ppm(feat))
        h, w = (output_size(s, self.zoom_factor) for s in x.shape[-2:])
        return F.interpolate(logits, (h, w), mode="bilinear", align_corners=True)
