"""The state a training stage starts from: seeded generators, and the frozen parts of the model
(backbone, and a base learner where there is one) on the device, as the checkpoint files keep them."""
from __future__ import annotations

import itertools
import random

import numpy as np
import torch

from model.base import FewShotModel


def seed_everything(seed: int) -> None:
    """Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def frozen(model: FewShotModel, device: torch.device) -> None:
    """The model on ``device`` in eval mode, its frozen modules (backbone, base learner) without
    gradients (stage 1 turns the base learner's on for itself)."""
    model.to(device).eval()
    for module in model.frozen_modules():
        module.requires_grad_(False)


@torch.no_grad()
def round_as_saved(model: FewShotModel) -> None:
    """Round the frozen modules to float16, as the files keep them: meta-training then sees the
    backbone and base learner that meta-testing loads, whether or not its run trained them."""
    for module in model.frozen_modules():
        for tensor in itertools.chain(module.parameters(), module.buffers()):
            if tensor.is_floating_point():
                tensor.copy_(tensor.half())
