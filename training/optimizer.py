"""SGD at the reference's poly learning rates, for both training stages."""
from __future__ import annotations

import torch
from torch import Tensor, nn


def make_optimizer(groups: list[tuple[list[nn.Parameter], float]], cfg) -> torch.optim.SGD:
    """SGD over (parameters, initial learning rate) groups; ``sgd_step`` decays every rate."""
    return torch.optim.SGD([{"params": params, "lr": lr, "initial_lr": lr} for params, lr in groups],
                           momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def sgd_step(optimizer: torch.optim.Optimizer, loss: Tensor, it: int, total: int, power: float) -> float:
    """One optimiser step at the poly learning rates of step ``it``; returns the first group's."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * (1 - it / total) ** power
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return optimizer.param_groups[0]["lr"]
