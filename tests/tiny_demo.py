"""A tiny generated demo benchmark with its config and a random-weight checkpoint, for the
tests that run meta_test.py end to end."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import yaml

from model import build_model
from util.config import load_config
from dataset.demo import generate_demo


def tiny_demo(root: Path, method: dict, test_finetune: dict, foreground_bias: Optional[float] = None) -> Path:
    """Write ``root/demo`` (60 val images at 128 px), ``root/demo.yaml`` and ``root/weights.pth``
    (seed 0; ``foreground_bias`` added to the meta classifier's foreground logit so that
    predictions mix foreground and background). Returns the config path."""
    generate_demo(root / "demo", seed=0, num_train=8, num_val=60, size=128)
    config = {"Data": {"data_set": "demo", "split": 0, "data_root": str(root / "demo"),
                       "lists_root": str(root / "demo" / "lists"), "val_size": 97},
              "Method": {"backbone": "mobilenetv2", **method},
              "Test_Finetune": {"weight_path": str(root / "weights.pth"), **test_finetune}}
    path = root / "demo.yaml"
    path.write_text(yaml.safe_dump(config))
    torch.manual_seed(0)
    model = build_model(load_config(path))
    if foreground_bias is not None:
        with torch.no_grad():
            model.cls_meta[3].bias.copy_(torch.tensor([0.0, foreground_bias]))
    torch.save({"epoch": 1, "state_dict": model.state_dict()}, root / "weights.pth")
    return path


def finished_tiny_run(root: Path) -> tuple[Path, Path, Path]:
    """``tiny_demo`` with small heads, 2 episodes, 1 seed and 2 rounds, and one finished run of
    it in ``root/done``. Returns (root, config path, the run's folder)."""
    import meta_test

    path = tiny_demo(root, {"reduce_dim": 16, "base_width": 16},
                     {"test_num": 2, "num_seeds": 1, "workers": 0, "tb_images": 0, "ft_number": 2})
    meta_test.main(["--config", str(path), "--exp-dir", str(root / "done")])
    return root, path, root / "done"
