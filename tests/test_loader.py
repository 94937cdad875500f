"""The episode loader's workers are forked from a process that has already used OpenCV."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SCRIPT = """
import cv2, numpy as np, torch
import dataset.fewshot as dataset
from torch.utils.data import Dataset

class Resizes(Dataset):
    def __len__(self): return 4
    def __getitem__(self, i): return torch.from_numpy(cv2.resize(np.ones((500, 500, 3), np.float32), (473, 473)))

cv2.resize(np.ones((2000, 2000, 3), np.float32), (1500, 1500))   # the main process uses OpenCV first
items = list(dataset.episode_loader(Resizes(), [0, 1, 2, 3], 2, torch.device("cpu")))
print(len(items), cv2.getNumThreads())
"""


def test_workers_forked_after_opencv_do_not_hang():
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["4", "1"]   # all items arrived; OpenCV runs without its own pool
