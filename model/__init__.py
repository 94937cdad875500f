"""Few-shot segmentation base models (MSANet, BAM, HSNet) and the EFTNet fine-tuner.

Nothing here reads a config file or knows a dataset: models are built from plain arguments
(``create_model``). ``build_model(cfg)`` takes a loaded config, which supplies those arguments
itself (``cfg.model_arguments()``, in util/config.py).
"""
from __future__ import annotations

from typing import Any

from model.bam import BAM
from model.base import FewShotModel, Prediction
from model.hsnet import HSNet
from model.msanet import MSANet
from model.prototype import Guidance, PrototypeModel, ShotStats

__all__ = ["build_model", "create_model", "FewShotModel", "PrototypeModel", "MSANet", "BAM", "HSNet", "Guidance",
           "Prediction", "ShotStats"]
ARCHS: dict[str, type[FewShotModel]] = {"MSANet": MSANet, "BAM": BAM, "HSNet": HSNet}


def create_model(arch: str = "MSANet", **arguments: Any) -> FewShotModel:
    """A model of ``arch`` with random weights; ``arguments`` are the class's (backbone, shot,
    num_base_classes, widths, ...)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}: expected one of {', '.join(ARCHS)}")
    return ARCHS[arch](**arguments)


def build_model(cfg: Any) -> FewShotModel:
    """The model of ``cfg.arch`` with random weights, as a loaded config describes; reads no files."""
    return create_model(**cfg.model_arguments())
