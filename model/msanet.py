"""MSANet (BAM + multi-similarity correlation + guided attention), eval-mode forward as released."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model import similarity
from model.backbones import Features
from model.prototype import Guidance, PrototypeModel, ShotStats
from model.ops import CORRELATION_EPS, chained_masks, cosine_prior, masked_correlation, resize, unit_vectors
from model.similarity import CacheBudget, SimilarityColumns

# Correlation maps per level (l2, l3, l4), counted from the end of the tap list; the
# ResNet layer1 tap is never used by any output, so it is not correlated at all.
CORRELATION_LEVELS = {"resnet50": (4, 6, 3), "resnet101": (4, 23, 3), "vgg": (3, 3, 1), "mobilenetv2": (3, 4, 3)}
HYPER_CHANNELS = 64


class GuidedAttention(nn.Module):
    """GAM: channel gates from the masked support feature, applied to the whole feature map."""

    def __init__(self, channels: int, drop_rate: float = 0.5):
        super().__init__()
        self.gate = nn.Sequential(nn.Conv2d(channels, channels, 1), nn.ReLU(), nn.Conv2d(channels, channels, 1),
                                  nn.Dropout(p=drop_rate), nn.Sigmoid())

    def forward(self, feat: Tensor, mask: Tensor) -> Tensor:
        # The reference pools over all positions (not normalised by the mask area).
        return self.gate(F.adaptive_avg_pool2d(feat * mask, 1)) * feat


class MSANet(PrototypeModel):
    with_taps = True

    def __init__(self, backbone: str, shot: int, num_base_classes: int, reduce_dim: int = 256,
                 kshot_trans_dim: int = 2, zoom_factor: int = 8, kshot_order_quirk: bool = True,
                 vgg_l2_last_shot_quirk: bool = True, base_width: int = 512):
        if backbone not in CORRELATION_LEVELS:
            raise ValueError(f"MSANet backbone must be one of {sorted(CORRELATION_LEVELS)}, got {backbone!r}")
        super().__init__(backbone, shot, num_base_classes, reduce_dim + HYPER_CHANNELS + 1, reduce_dim,
                         kshot_trans_dim, zoom_factor, kshot_order_quirk, base_width)
        self.levels = CORRELATION_LEVELS[backbone]
        self.vgg_l2_last_shot_quirk = vgg_l2_last_shot_quirk
        self.gam = GuidedAttention(reduce_dim)
        self.hyper_final = nn.Sequential(nn.Conv2d(sum(self.levels), HYPER_CHANNELS, 1, padding="same"),
                                         nn.BatchNorm2d(HYPER_CHANNELS), nn.ReLU(inplace=True))

    def match(self, query: Features, support: Features, masks: Tensor,
              tables: Optional["SimilarityTables"] = None) -> ShotStats:
        """``tables`` (from ``matcher``) replace the prior's and correlations' products."""
        bs, k = masks.shape[:2]
        full = (masks == 1).float().flatten(0, 1).unsqueeze(1)                     # [Bs*K, 1, S, S]
        size = support.layer3.shape[-2:]
        if tables is None:
            prior = cosine_prior(query.layer4, support.layer4, full.view(bs, k, *full.shape[1:]),
                                 query.layer3.shape[-2:], self._l4_norm(query))
        else:
            prior = tables.prior(full, query.layer3.shape[-2:])
        batch = prior.shape[0]

        def per_shot(t: Tensor) -> Tensor:
            return t.reshape(bs, k, *t.shape[1:]).expand(batch, -1, *t.shape[1:])

        chain = chained_masks(full, [t.shape[-2:] for t in support.taps])[self._first_tap(support):]
        if tables is None:
            maps = [masked_correlation(unit, tap, mask, bs)
                    for unit, tap, mask in zip(self._tap_units(query), self._correlated_taps(support), chain)]
        else:
            maps = tables.correlations(chain)
        n2, n3, _ = self.levels
        return ShotStats(est=self._est(query, support, bs).expand(batch, -1), prior=prior,
                         mask_proto=per_shot(resize(full, size)), mask_gam=per_shot(resize(full, size, "nearest")),
                         corr_l2=torch.cat(maps[:n2], 2), corr_l3=torch.cat(maps[n2:n2 + n3], 2),
                         corr_l4=torch.cat(maps[n2 + n3:], 2))

    def matcher(self, query: Features, support: Features, budget: Optional[CacheBudget] = None):
        """``match`` for fixed images and changing masks; with one support image and a budget,
        similarity products are kept between calls (same statistics, far less work)."""
        if budget is None or support.batch != 1:
            return super().matcher(query, support, budget)
        tables = SimilarityTables(self, query, support, budget)
        return lambda masks: self.match(query, support, masks, tables)

    def _first_tap(self, feats: Features) -> int:
        return len(feats.taps) - sum(self.levels)

    def _correlated_taps(self, feats: Features) -> list[Tensor]:
        return feats.taps[self._first_tap(feats):]

    def _tap_units(self, feats: Features) -> list[Tensor]:
        return self.cached(feats, "tap_units", lambda f: [unit_vectors(t) for t in self._correlated_taps(f)])

    def _l4_norm(self, feats: Features) -> Tensor:
        return self.cached(feats, "l4_norm", lambda f: f.layer4.flatten(2).norm(2, 1, True))

    def guide(self, stats: ShotStats, embeddings: Tensor) -> Guidance:
        prototype, prior, est = self._prototype_prior_est(stats, embeddings)
        batch, k = stats.est.shape
        gam = self.gam(embeddings.flatten(0, 1), stats.mask_gam.flatten(0, 1))
        gam = gam.reshape(batch, k, *gam.shape[1:]).sum(1) / k
        l3 = stats.corr_l3.sum(1) / k
        l4 = stats.corr_l4.sum(1) / k
        if self.is_vgg:
            # MSANet reads the last shot's layer3 correlation only (a bug kept for the released weights).
            l2 = stats.corr_l2[:, -1] if self.vgg_l2_last_shot_quirk else stats.corr_l2.sum(1) / k
            l2 = resize(l2, l3.shape[-2:])
        else:
            l2 = stats.corr_l2.sum(1) / k
        hyper = self.hyper_final(torch.cat([l2, l3, l4], 1))
        return Guidance(prototype=prototype, prior=prior, est=est, hyper=hyper, gam=gam)

    def merge_inputs(self, guidance: Guidance) -> list[Tensor]:
        return [guidance.hyper, guidance.prior, guidance.gam]


class SimilarityTables:
    """The products behind MSANet's prior and correlations between fixed ``rows`` images and
    one fixed support image, kept across masks (see model/similarity.py)."""

    def __init__(self, model: MSANet, rows: Features, support: Features, budget: CacheBudget):
        columns = [tap[0].flatten(1) for tap in model._correlated_taps(support)]          # [C, P] each
        row_taps = [tap.flatten(2) for tap in model._correlated_taps(rows)]                 # [R, C, Q] each
        self.taps = [SimilarityColumns(row, col, budget, torch.relu_, 1 / (row.norm(dim=1) + CORRELATION_EPS))
                     for row, col in zip(row_taps, columns)]
        self.tap_norms = [col.norm(dim=0) for col in columns]
        self.tap_sizes = [tap.shape[-2:] for tap in model._correlated_taps(support)]
        l4 = support.layer4[0].flatten(1)
        self.l4 = SimilarityColumns(rows.layer4.flatten(2), l4, budget)
        self.l4_norms = (model._l4_norm(rows)[:, 0], l4.norm(dim=0))
        self.l4_size = support.layer4.shape[-2:]

    def prior(self, mask: Tensor, out_size: torch.Size) -> Tensor:
        return similarity.prior(self.l4, *self.l4_norms, mask, self.l4_size, out_size)

    def correlations(self, chain: list[Tensor]) -> list[Tensor]:
        return [similarity.correlation(table, size, norm, mask)
                for table, size, norm, mask in zip(self.taps, self.tap_sizes, self.tap_norms, chain)]
