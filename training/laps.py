"""Wall-clock times of a training run's phases (set-up, stage 1, features, stage 2, validation)."""
from __future__ import annotations

import time


class Laps:
    """Wall-clock seconds of consecutive phases: ``laps(name)`` ends the phase ``name``."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name], self._last = now - self._last, now
