"""Frozen backbone features of every image of a list, kept once for training."""
from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm import tqdm

from model.backbones import Features
from model.base import FewShotModel


class FeatureStore:
    """Frozen backbone features of every image, float16 on the CPU, handed out as batches.

    Fields that are the same tensor (a MobileNetV2 stage output is its last block's tap) are
    stored once."""

    def __init__(self, model: FewShotModel, loader: DataLoader, device: torch.device):
        self.model = model
        self.slots: list[Tensor] = []
        self.slot_of: list[int] = []
        self.base_logits: Tensor | None = None
        labels, start = [], 0
        for images, label in tqdm(loader, desc="backbone features", dynamic_ncols=True):
            feats = model.extract(images.to(device))
            fields = [feats.layer2, feats.layer3, feats.layer4, feats.mid, *feats.taps]
            if not self.slots:
                self.image_size = feats.image_size
                for i, t in enumerate(fields):
                    same = [j for j in range(i) if fields[j] is t]
                    self.slot_of.append(self.slot_of[same[0]] if same else len(self.slots))
                    if not same:
                        self.slots.append(torch.empty(len(loader.dataset), *t.shape[1:], dtype=torch.float16))
            for slot, t in zip(self.slot_of, fields):
                self.slots[slot][start:start + len(images)] = t.cpu()
            labels.append(label)
            start += len(images)
        self.labels = torch.cat(labels)  # [N, S, S] class ids, 255 on void and padding

    def field(self, index: int, items: Tensor, device: torch.device) -> Tensor:
        """Field ``index`` (layer2, layer3, layer4, mid, then the taps) of some images, float32."""
        return self.slots[self.slot_of[index]][items].to(device, torch.float32)

    def layer3(self, items: Tensor, device: torch.device) -> Tensor:
        return self.field(1, items, device)

    def layer4(self, items: Tensor, device: torch.device) -> Tensor:
        return self.field(2, items, device)

    def add_base_logits(self, device: torch.device) -> None:
        """Keep the frozen base learner's logits of every image: batches then carry them, so
        that meta-training does not recompute them at every step."""
        self.model.learner_base.eval()
        with torch.no_grad():
            self.base_logits = torch.cat([self.model.learner_base(self.layer4(items, device)).cpu()
                                          for items in torch.arange(len(self.labels)).split(64)])

    def batch(self, items: Tensor, device: torch.device) -> Features:
        fields = [self.field(i, items, device) for i in range(len(self.slot_of))]
        feats = Features(*fields[:4], fields[4:], self.image_size)
        if self.base_logits is not None:
            self.model.keep_base_logits(feats, self.base_logits[items].to(device))
        return feats


def layer_maps(model: FewShotModel, loader: DataLoader, device: torch.device, layer: str) -> tuple[Tensor, Tensor]:
    """One backbone stage's maps of every image (float16, on the CPU) and the labels [N, S, S]:
    the base learner's training set, which needs no other field."""
    maps, labels = [], []
    for images, label in tqdm(loader, desc=f"backbone {layer}", dynamic_ncols=True):
        maps.append(model.stage(images.to(device), layer).to("cpu", torch.float16))
        labels.append(label)
    return torch.cat(maps), torch.cat(labels)
