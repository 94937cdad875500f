"""Frozen backbone features of every image of a list, kept once for training (MSANet/BAM's
stages and taps, HSNet's per-block maps), and BAM's masked support maps kept for every step of
meta-training."""
from __future__ import annotations

import logging

import torch
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm import tqdm

from dataset.episodes import EpisodeSampler
from model.backbones import Features
from model.bam import BAM
from model.hsnet import FeatureStack, HSNet
from model.prototype import PrototypeModel
from model.contract import IGNORE

log = logging.getLogger(__name__)


def class_masks(labels: Tensor, classes: Tensor) -> Tensor:
    """Class ids [B,...,S,S] -> 0/1/255 masks of the per-episode class [B] (as dataset.fewshot)."""
    chosen = classes.view(-1, *[1] * (labels.dim() - 1))
    return torch.where(labels == IGNORE, IGNORE, (labels == chosen).long())


class FeatureStore:
    """Frozen backbone features of every image, float16 on the CPU, handed out as batches.

    Fields that are the same tensor (a MobileNetV2 stage output is its last block's tap) are
    stored once."""

    def __init__(self, model: PrototypeModel, loader: DataLoader, device: torch.device):
        self.model = model
        self.slots: list[Tensor] = []
        self.slot_of: list[int] = []
        self.base_logits: Tensor | None = None
        self.masked: MaskedLayer4 | None = None
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

    def batch(self, items: Tensor, device: torch.device, classes: Tensor | None = None) -> Features:
        """Features of some images; as supports of ``classes`` [len(items)], with BAM's masked
        layer4 maps when ``add_masked_layer4`` computed them for those (image, class) pairs."""
        fields = [self.field(i, items, device) for i in range(len(self.slot_of))]
        feats = Features(*fields[:4], fields[4:], self.image_size)
        if self.base_logits is not None:
            self.model.keep_base_logits(feats, self.base_logits[items].to(device))
        if self.masked is not None and classes is not None:
            self.masked.attach(feats, items, classes, device)
        return feats

    def masked_layer4_bytes(self, pairs: int) -> int:
        """Memory that ``add_masked_layer4`` takes for this many pairs (float32 layer4 maps and
        masks at layer3's size)."""
        layer3, layer4 = (self.slots[self.slot_of[i]] for i in (1, 2))
        return pairs * (layer4[0].numel() + layer3[0, 0].numel()) * 4

    def add_masked_layer4(self, model: BAM, pairs: list[tuple[int, int]], chunk: int, device: torch.device) -> None:
        """Compute BAM's layer4 of every support (image index, class) pair, masked by its class,
        once for all meta-training steps instead of at every step (5-shot: 40 supports a step).

        The pairs go through in chunks of ``chunk`` supports, a training step's support batch:
        a CPU convolution's last bits can depend on its batch size (oneDNN picks its kernel by
        it), and the kept maps are then bitwise those that each step would compute."""
        images = torch.tensor([i for i, _ in pairs])
        classes = torch.tensor([c for _, c in pairs])
        masks, maps = [], []
        for rows in tqdm(torch.arange(len(pairs)).split(chunk), desc="masked support layer4", dynamic_ncols=True):
            padded = torch.cat([rows, rows[-1:].expand(chunk - len(rows))])  # a full step's batch
            support = self.batch(images[padded], device)
            full = (class_masks(self.labels[images[padded]].long(), classes[padded]) == 1).float().unsqueeze(1)
            mask_l3, layer4 = model.masked_layer4(support, full.to(device))
            masks.append(mask_l3[:len(rows)].cpu())
            maps.append(layer4[:len(rows)].cpu())
        self.masked = MaskedLayer4(pairs, torch.cat(masks), torch.cat(maps))

    def drop_masked_layer4(self) -> None:
        self.masked = None


class TapStore:
    """HSNet's per-block maps of every image, float16 on the CPU, handed out as batches."""

    def __init__(self, model: HSNet, loader: DataLoader, device: torch.device):
        self.taps: list[Tensor] = []
        labels, start = [], 0
        for images, label in tqdm(loader, desc="backbone features", dynamic_ncols=True):
            feats = model.extract(images.to(device))
            if not self.taps:
                self.image_size = feats.image_size
                self.taps = [torch.empty(len(loader.dataset), *t.shape[1:], dtype=torch.float16) for t in feats.taps]
            for kept, t in zip(self.taps, feats.taps):
                kept[start:start + len(images)] = t.cpu()
            labels.append(label)
            start += len(images)
        self.labels = torch.cat(labels)  # [N, S, S] class ids, 255 on void and padding

    def batch(self, items: Tensor, device: torch.device) -> FeatureStack:
        return FeatureStack([t[items].to(device, torch.float32) for t in self.taps], self.image_size)


class MaskedLayer4:
    """BAM's masked support maps of (image, class) pairs, handed to the supports of a step."""

    def __init__(self, pairs: list[tuple[int, int]], masks: Tensor, maps: Tensor):
        self.row = {pair: row for row, pair in enumerate(pairs)}
        self.masks, self.maps = masks, maps

    def attach(self, support: Features, items: Tensor, classes: Tensor, device: torch.device) -> None:
        rows = [self.row.get(pair) for pair in zip(items.tolist(), classes.tolist())]
        if None not in rows:  # otherwise BAM computes them
            BAM.keep_masked_layer4(support, self.masks[rows].to(device), self.maps[rows].to(device))


def layer_maps(model: PrototypeModel, loader: DataLoader, device: torch.device, layer: str) -> tuple[Tensor, Tensor]:
    """One backbone stage's maps of every image (float16, on the CPU) and the labels [N, S, S]:
    the base learner's training set, which needs no other field."""
    maps, labels = [], []
    for images, label in tqdm(loader, desc=f"backbone {layer}", dynamic_ncols=True):
        maps.append(model.stage(images.to(device), layer).to("cpu", torch.float16))
        labels.append(label)
    return torch.cat(maps), torch.cat(labels)


def keep_masked_supports(model: BAM, store: FeatureStore, sampler: EpisodeSampler, budget_mb: float,
                         device: torch.device) -> None:
    """BAM's masked support layer4 maps of every (image, class) that can be drawn, kept for all
    steps when they fit in ``budget_mb`` (support_cache_mb)."""
    pairs = sampler.support_pairs()
    needed = store.masked_layer4_bytes(len(pairs))
    if needed > budget_mb * 2**20:
        log.info("stage 2: the masked layer4 maps of the %d support (image, class) pairs would take %.0f MB, over "
                 "support_cache_mb %g: computed at every step instead", len(pairs), needed / 2**20, budget_mb)
        return
    store.add_masked_layer4(model, pairs, sampler.batch * sampler.shot, device)
