"""The state a training stage starts from: seeded generators, and the frozen parts of the model
(backbone and base learner) on the device, as the checkpoint files keep them."""
from __future__ import annotations

import itertools
import random

import numpy as np
import torch

from model.prototype import FROZEN_MODULES, PrototypeModel


def seed_everything(seed: int) -> None:
    """Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def frozen(model: PrototypeModel, device: torch.device) -> None:
    """The model on ``device`` in eval mode, its backbone and base learner without gradients
    (stage 1 turns the base learner's on for itself)."""
    model.to(device).eval()
    for name in FROZEN_MODULES:
        getattr(model, name).requires_grad_(False)


@torch.no_grad()
def round_as_saved(model: PrototypeModel) -> None:
    """Round the backbone and base learner to float16, as the files keep them: meta-training then
    sees the base learner that meta-testing loads, whether or not its run trained it."""
    for name in FROZEN_MODULES:
        for tensor in itertools.chain(getattr(model, name).parameters(), getattr(model, name).buffers()):
            if tensor.is_floating_point():
                tensor.copy_(tensor.half())
