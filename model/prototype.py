"""What MSANet and BAM share: backbone, base learner, meta-learner head, ensemble, k-shot weights.

Their five steps (model/base.py) are:

1. ``extract``: the frozen backbone's stages, MSANet's taps and the Gram matrix;
2. ``match``: the prior, the Gram distance, the resized masks and MSANet's correlations
   (``ShotStats``), cacheable while the masks stay fixed;
3. ``embed`` (down_supp features) + ``guide``: prototype, prior and the model's other maps,
   combined over the shots with the k-shot weights (``Guidance``);
4. ``decode``: meta learner, base learner and the Gram-adjusted ensemble.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.backbones import BACKBONES, Features, imagenet_key
from model.base import Blendable, FewShotModel, Prediction, ShotTable
from model.contract import IGNORE
from model.ops import gram_distance, gram_matrix, resize, weighted_gap
from model.pspnet import base_learner, output_size

# Modules EFTNet fine-tunes, in the reference optimizer's group order (kshot_rw only for K > 1).
ADAPTED_MODULES = ("down_query", "down_supp", "init_merge", "ASPP_meta", "res1_meta", "res2_meta",
                   "cls_meta", "gram_merge", "cls_merge", "kshot_rw")
BACKBONE_MODULES = ("layer0", "layer1", "layer2", "layer3", "layer4")
BACKBONE_PREFIXES = tuple(f"{name}." for name in BACKBONE_MODULES)
# Backbone and base learner: what a PSPNet base file holds, frozen during meta-learning.
FROZEN_MODULES = (*BACKBONE_MODULES, "learner_base")
BASE_LOGITS = "base_low"  # Features.cache key of the base learner's logits at feature resolution


@dataclass
class ShotStats(ShotTable):
    """Parameter-free statistics of each (query, support shot) pair, every field [B, K, ...]."""

    est: Tensor                      # Gram distance [B, K]
    prior: Tensor                    # [B, K, 1, N, N]
    mask_proto: Tensor               # support mask, bilinear at the feature size [B, K, 1, N, N]
    mask_gam: Optional[Tensor] = None    # MSANet: nearest-resized mask for GAM
    corr_l2: Optional[Tensor] = None     # MSANet: correlation maps per level [B, K, n, h, w]
    corr_l3: Optional[Tensor] = None
    corr_l4: Optional[Tensor] = None


@dataclass
class Guidance(Blendable):
    """Support guidance for the decoder, combined over shots. ``est`` comes from the real
    supports only and is never blended; the other fields are (MSANet) or may be None (BAM)."""

    UNBLENDED: ClassVar[tuple[str, ...]] = ("est",)

    prototype: Tensor                # [B, C, 1, 1]
    prior: Tensor                    # [B, 1, N, N]
    est: Tensor                      # [B, 1, 1, 1]
    hyper: Optional[Tensor] = None   # [B, 64, N, N]
    gam: Optional[Tensor] = None     # [B, C, N, N]


class PrototypeModel(FewShotModel):
    """Backbone + base learner + meta learner shared by MSANet and BAM (keys as released)."""

    backbone_prefixes = BACKBONE_PREFIXES
    predicts_base_classes = True

    def __init__(self, backbone: str, shot: int, num_base_classes: int, merge_channels: int,
                 reduce_dim: int = 256, kshot_trans_dim: int = 2, zoom_factor: int = 8,
                 kshot_order_quirk: bool = False, base_width: int = 512):
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {backbone!r}: expected one of {sorted(BACKBONES)}")
        self.backbone_name = backbone
        self.spec = BACKBONES[backbone]
        self.shot = shot
        self.zoom_factor = zoom_factor
        self.kshot_order_quirk = kshot_order_quirk
        self.is_vgg = backbone == "vgg"
        self.layer0, self.layer1, self.layer2, self.layer3, self.layer4 = self.spec.build()
        self.learner_base = base_learner(self.spec.fea_dim, num_base_classes + 1, base_width)
        mid_dim = self.spec.mid_dim

        def reduce() -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(mid_dim, reduce_dim, 1, bias=False), nn.ReLU(inplace=True),
                                 nn.Dropout2d(p=0.5))

        self.down_query, self.down_supp = reduce(), reduce()
        self.init_merge = nn.Sequential(nn.Conv2d(reduce_dim * 2 + merge_channels, reduce_dim, 1, bias=False),
                                        nn.ReLU(inplace=True))
        self.ASPP_meta = ASPP(reduce_dim)
        self.res1_meta = nn.Sequential(nn.Conv2d(reduce_dim * 5, reduce_dim, 1, bias=False), nn.ReLU(inplace=True))
        self.res2_meta = nn.Sequential(
            nn.Conv2d(reduce_dim, reduce_dim, 3, padding=1, bias=False), nn.ReLU(inplace=True),
            nn.Conv2d(reduce_dim, reduce_dim, 3, padding=1, bias=False), nn.ReLU(inplace=True))
        self.cls_meta = nn.Sequential(
            nn.Conv2d(reduce_dim, reduce_dim, 3, padding=1, bias=False), nn.ReLU(inplace=True),
            nn.Dropout2d(p=0.1), nn.Conv2d(reduce_dim, 2, 1))
        self.gram_merge = nn.Conv2d(2, 1, 1, bias=False)
        self.cls_merge = nn.Conv2d(2, 1, 1, bias=False)
        with torch.no_grad():  # both start as "take the first input"
            self.gram_merge.weight.copy_(torch.tensor([1.0, 0.0]).view(1, 2, 1, 1))
            self.cls_merge.weight.copy_(torch.tensor([1.0, 0.0]).view(1, 2, 1, 1))
        if shot > 1:
            self.kshot_rw = nn.Sequential(nn.Conv2d(shot, kshot_trans_dim, 1), nn.ReLU(inplace=True),
                                          nn.Conv2d(kshot_trans_dim, shot, 1))

    # ---- 1. frozen features -------------------------------------------------------------
    with_taps = False

    @torch.no_grad()
    def extract(self, images: Tensor) -> Features:
        """Backbone features of [N,3,S,S] images (no autograd: the backbone is frozen)."""
        layers = [self.layer0, self.layer1, self.layer2, self.layer3, self.layer4]
        stages, taps = self.spec.run(layers, images, self.with_taps)
        l2, l3, l4 = stages[2:]
        mid = torch.cat([l3, resize(l2, l3.shape[-2:]) if self.is_vgg else l2], 1)
        return Features(l2, l3, l4, mid, taps, tuple(images.shape[-2:]))

    @torch.no_grad()
    def stage(self, images: Tensor, name: str) -> Tensor:
        """One backbone stage's output (``layer0`` .. ``layer4``), without running the later
        stages or taking taps: what training the base learner reads."""
        layers = [getattr(self, n) for n in BACKBONE_MODULES[:BACKBONE_MODULES.index(name) + 1]]
        return self.spec.run(layers, images, False)[0][-1]

    @staticmethod
    def cached(feats: Features, key: str, compute):
        """``compute(feats)`` once per Features object (frozen inputs, so never stale)."""
        if key not in feats.cache:
            with torch.no_grad():
                feats.cache[key] = compute(feats)
        return feats.cache[key]

    def gram(self, feats: Features) -> Tensor:
        """Gram matrix of the low-level features."""
        return self.cached(feats, "gram", lambda f: gram_matrix(self.gram_input(f)))

    def gram_input(self, feats: Features) -> Tensor:
        return feats.layer2

    def base_prediction(self, feats: Features) -> Tensor:
        """Frozen base-learner logits at input resolution."""
        size = [output_size(s, self.zoom_factor) for s in feats.image_size]
        return self.cached(feats, "base", lambda f: resize(self.learner_base_low(f), size))

    # ---- 2. parameter-free statistics ---------------------------------------------------
    def _est(self, query: Features, support: Features, bs: int) -> Tensor:
        support_gram = self.gram(support)
        return gram_distance(self.gram(query), support_gram.reshape(bs, -1, *support_gram.shape[1:]))

    # ---- 3. trainable guidance ----------------------------------------------------------
    def embed(self, support: Features) -> Tensor:
        """down_supp features of support images [N, C, h, w]."""
        return self.down_supp(support.mid)

    def shot_weights(self, est: Tensor) -> Tensor:
        """Softmax shot weights [B, K] from the Gram distances (all ones for one shot)."""
        k = est.shape[1]
        if k == 1:
            return torch.ones_like(est)
        if k != self.shot:
            raise ValueError(f"this model was built for {self.shot} shots, got {k} supports")
        sorted_est, order = est.sort(1)
        weight = self.kshot_rw(sorted_est[..., None, None]).flatten(1)
        if not self.kshot_order_quirk:  # map each weight back to the support it was computed for
            weight = weight.gather(1, order.argsort(1))
        # MSANet's quirk: weights computed in sorted order are applied in the original order.
        return weight.softmax(1)

    def _prototype_prior_est(self, stats: ShotStats, embeddings: Tensor) -> tuple[Tensor, ...]:
        weights = self.shot_weights(stats.est)                                      # [B, K]
        prototypes = weighted_gap(embeddings.flatten(0, 1), stats.mask_proto.flatten(0, 1))
        prototypes = prototypes.reshape(*weights.shape, -1, 1, 1)
        w = weights[..., None, None, None]
        prototype = (w * prototypes).sum(1)
        prior = (w * stats.prior).sum(1)
        est = (weights * stats.est).sum(1).view(-1, 1, 1, 1)
        return prototype, prior, est

    # ---- 4. decoding --------------------------------------------------------------------
    def merge_inputs(self, guidance: Guidance) -> list[Tensor]:
        """Guidance maps concatenated after the query feature and the tiled prototype."""
        raise NotImplementedError

    def decode(self, query: Features, guidance: Guidance, exclude: Optional[Tensor] = None) -> Prediction:
        """Meta learner on the query plus guidance, base learner, ensemble. ``exclude`` [B]
        (meta-training only) names the base channel of the episode's own class, which is left
        out of the base map as in BAM's training."""
        query_feat = self.down_query(query.mid)
        merged = torch.cat([query_feat, guidance.prototype.expand_as(query_feat), *self.merge_inputs(guidance)], 1)
        x = self.res1_meta(self.ASPP_meta(self.init_merge(merged)))
        x = self.res2_meta(x) + x
        meta = self.cls_meta(x)
        base = self.base_prediction(query)
        final = self.ensemble(meta, self.learner_base_low(query), guidance.est, exclude)
        size = base.shape[-2:]
        return Prediction(resize(final, size), resize(meta, size), base)

    def learner_base_low(self, query: Features) -> Tensor:
        """Base-learner logits at feature resolution (the ensemble works there)."""
        return self.cached(query, BASE_LOGITS, lambda f: self.learner_base(f.layer4))

    @staticmethod
    def keep_base_logits(feats: Features, logits: Tensor) -> None:
        """Hand in the frozen base learner's logits of ``feats`` at feature resolution, computed
        earlier (training keeps them for every image), so that decoding does not recompute them."""
        feats.cache[BASE_LOGITS] = logits

    def ensemble(self, meta: Tensor, base: Tensor, est: Tensor, exclude: Optional[Tensor] = None) -> Tensor:
        """BAM ensemble: Gram-adjusted meta probabilities, background merged with base classes."""
        meta_soft = meta.softmax(1)
        base_soft = base.softmax(1)
        base_map = base_soft[:, 1:].sum(1, True)
        if exclude is not None:
            base_map = base_map - base_soft.gather(1, exclude.view(-1, 1, 1, 1).expand(-1, 1, *base.shape[-2:]))
        est_map = est.expand_as(meta_soft[:, 1:])
        bg = self.gram_merge(torch.cat([meta_soft[:, :1], est_map], 1))
        fg = self.gram_merge(torch.cat([meta_soft[:, 1:], est_map], 1))
        return torch.cat([self.cls_merge(torch.cat([bg, base_map], 1)), fg], 1)

    def imagenet_backbone_state(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """An ImageNet file's state_dict under this model's ``layer0..4`` keys (classifier dropped)."""
        return {new: v for k, v in state.items() if (new := imagenet_key(k, self.backbone_name)) is not None}

    def adapted_modules(self) -> list[nn.Module]:
        """The meta-learner modules EFTNet fine-tunes (the reference optimizer's groups)."""
        return [getattr(self, name) for name in ADAPTED_MODULES if hasattr(self, name)]

    def frozen_modules(self) -> list[nn.Module]:
        return [getattr(self, name) for name in FROZEN_MODULES]

    def adaptation_loss(self, prediction: Prediction, label: Tensor, aux_weight: float) -> Tensor:
        """The reference's: cross-entropy of the ensemble's output (not logits) plus
        ``aux_weight`` times that of the meta logits."""
        return (F.cross_entropy(prediction.final, label, ignore_index=IGNORE)
                + aux_weight * F.cross_entropy(prediction.meta, label, ignore_index=IGNORE))


class ASPP(nn.Module):
    """Five parallel branches (global pool, 1x1, 3x3 at dilation 6/12/18), each conv + ReLU."""

    def __init__(self, channels: int = 256):
        super().__init__()
        self.layer6_0 = nn.Sequential(nn.Conv2d(channels, channels, 1), nn.ReLU())
        self.layer6_1 = nn.Sequential(nn.Conv2d(channels, channels, 1), nn.ReLU())
        self.layer6_2 = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=6, dilation=6), nn.ReLU())
        self.layer6_3 = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=12, dilation=12), nn.ReLU())
        self.layer6_4 = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=18, dilation=18), nn.ReLU())
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        pooled = self.layer6_0(F.avg_pool2d(x, kernel_size=size)).expand(-1, -1, *size)
        return torch.cat([pooled, self.layer6_1(x), self.layer6_2(x), self.layer6_3(x), self.layer6_4(x)], 1)

