"""Shared pieces of the benchmark scripts: a random episode, timing, peak memory."""
from __future__ import annotations

import resource
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def random_episode(size: int, shot: int, device: torch.device, seed: int = 0) -> dict:
    """Normalised-looking random images and rectangular masks (with a padded band) of one episode."""
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(1, 3, size, size, generator=g)
    supports = torch.randn(1, shot, 3, size, size, generator=g)
    masks = torch.zeros(1, shot, size, size, dtype=torch.long)
    for k in range(shot):
        a = size // 6 + 3 * k
        masks[0, k, a:size // 2 + a, a:size // 2 + 2 * a] = 1
    padding = torch.zeros(1, size, size, dtype=torch.bool)
    padding[:, size - size // 8:] = True
    masks[:, :, size - size // 8:] = 255
    return {"query_img": query.to(device), "support_imgs": supports.to(device),
            "support_masks": masks.to(device), "padding": padding.to(device)}


@torch.no_grad()
def predict_foreground(model: torch.nn.Module, episode: dict, fraction: float = 0.3) -> None:
    """Make a random-weight model predict about ``fraction`` of the query as foreground, as a
    trained model does on an object (random heads give nearly constant logits, so masks
    would cover all or nothing): spread the meta logits and centre them at that quantile."""
    head = model.hpn_learner.decoder2[-1] if hasattr(model, "hpn_learner") else model.cls_meta[3]
    head.weight.mul_(30.0)
    head.bias.zero_()
    meta = model(episode["query_img"], episode["support_imgs"], episode["support_masks"]).meta
    head.bias.copy_(torch.tensor([0.0, -float((meta[:, 1] - meta[:, 0]).quantile(1 - fraction))]))


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs after one warm-up run."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def interleaved_times(parts: dict[str, Callable[[], object]], device: torch.device, repeats: int,
                      clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median time of each part over ``repeats`` rounds that run every part once in turn (so
    that a load which changes over time weighs on all parts alike); no warm-up here. ``clock``
    may be ``time.process_time`` (CPU seconds of this process: steady on a shared machine when
    PyTorch runs one thread)."""
    times: dict[str, list[float]] = {name: [] for name in parts}
    for _ in range(repeats):
        for name, fn in parts.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = clock()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[name].append(clock() - start)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated since the last reset, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
