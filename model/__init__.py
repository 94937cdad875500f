"""Few-shot segmentation base models (MSANet, BAM) and the EFTNet fine-tuner."""
from __future__ import annotations

from model.bam import BAM
from model.base import FewShotModel, Guidance, Prediction, ShotStats
from model.msanet import MSANet

__all__ = ["build_model", "FewShotModel", "MSANet", "BAM", "Guidance", "Prediction", "ShotStats"]


def build_model(cfg) -> FewShotModel:
    """MSANet or BAM (``cfg.arch``) with random weights, as configured; reads no files."""
    from util.config import backbone_name
    from util.splits import base_classes

    common = dict(backbone=backbone_name(cfg), shot=cfg.shot,
                  num_base_classes=len(base_classes(cfg.data_set, cfg.split, cfg.use_split_coco)),
                  reduce_dim=cfg.reduce_dim, base_width=cfg.base_width, kshot_trans_dim=cfg.kshot_trans_dim, zoom_factor=cfg.zoom_factor)
    if cfg.arch == "MSANet":
        return MSANet(**common, kshot_order_quirk=cfg.kshot_order_quirk,
                      vgg_l2_last_shot_quirk=cfg.vgg_l2_last_shot_quirk)
    if cfg.arch == "BAM":
        return BAM(**common)
    raise ValueError(f"unknown arch {cfg.arch!r}: expected MSANet or BAM")
