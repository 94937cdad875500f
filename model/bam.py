"""BAM (base and meta learners, Gram-adjusted ensemble), eval-mode forward as released."""
from __future__ import annotations

import torch
from torch import Tensor

from model.backbones import Features
from model.prototype import Guidance, PrototypeModel, ShotStats
from model.ops import cosine_prior, resize

# Features.cache key of support maps handed in by training: [masks at layer3's size, layer4 maps]
MASKED_LAYER4 = "masked_layer4"


class BAM(PrototypeModel):
    def __init__(self, backbone: str, shot: int, num_base_classes: int, reduce_dim: int = 256,
                 kshot_trans_dim: int = 2, zoom_factor: int = 8, base_width: int = 512):
        super().__init__(backbone, shot, num_base_classes, 1, reduce_dim, kshot_trans_dim, zoom_factor,
                         kshot_order_quirk=False, base_width=base_width)

    def gram_input(self, feats: Features) -> Tensor:
        # BAM-VGG overwrites layer2 with its layer3-sized copy before the Gram matrix.
        return resize(feats.layer2, feats.layer3.shape[-2:]) if self.is_vgg else feats.layer2

    def match(self, query: Features, support: Features, masks: Tensor) -> ShotStats:
        bs, k = masks.shape[:2]
        full = (masks == 1).float().flatten(0, 1).unsqueeze(1)
        mask_l3, support_l4 = self.masked_layer4(support, full)
        prior = cosine_prior(query.layer4, support_l4, full.view(bs, k, *full.shape[1:]), query.layer3.shape[-2:])
        batch = prior.shape[0]
        mask_proto = mask_l3.reshape(bs, k, *mask_l3.shape[1:]).expand(batch, -1, *mask_l3.shape[1:])
        return ShotStats(est=self._est(query, support, bs).expand(batch, -1), prior=prior, mask_proto=mask_proto)

    @torch.no_grad()
    def masked_layer4(self, support: Features, full: Tensor) -> tuple[Tensor, Tensor]:
        """The supports' foreground masks ``full`` [N,1,S,S] at layer3's size, and layer4 run on
        the masked support layer3 (BAM's prior input). Maps kept on ``support`` for the same
        masks (``keep_masked_layer4``) are taken instead of computed."""
        mask_l3 = resize(full, support.layer3.shape[-2:])
        kept = support.cache.get(MASKED_LAYER4)
        if kept is not None and torch.equal(kept[0], mask_l3):
            return mask_l3, kept[1]
        return mask_l3, self.layer4(support.layer3 * mask_l3)

    @staticmethod
    def keep_masked_layer4(support: Features, mask_l3: Tensor, maps: Tensor) -> None:
        """Hand in ``masked_layer4``'s maps of ``support`` for the masks ``mask_l3``, computed
        earlier (meta-training keeps them per image and class)."""
        support.cache[MASKED_LAYER4] = [mask_l3, maps]  # a list: sliced with the batch

    def guide(self, stats: ShotStats, embeddings: Tensor) -> Guidance:
        prototype, prior, est = self._prototype_prior_est(stats, embeddings)
        return Guidance(prototype=prototype, prior=prior, est=est)

    def merge_inputs(self, guidance: Guidance) -> list[Tensor]:
        return [guidance.prior]
