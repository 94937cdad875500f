"""Episode panels and the stacking command (evaluation/visualize.py)."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from evaluation import visualize


def one_episode(shot: int, size: int = 24) -> tuple[dict, torch.Tensor]:
    g = torch.Generator().manual_seed(shot)
    masks = torch.zeros(1, shot, size, size, dtype=torch.long)
    masks[..., 4:12, 4:12] = 1
    batch = {"query_img": torch.randn(1, 3, size, size, generator=g),
             "support_imgs": torch.randn(1, shot, 3, size, size, generator=g),
             "support_masks": masks, "query_mask": masks[:, 0]}
    prediction = torch.zeros(1, 2, size, size)
    prediction[:, 1, :10, :10] = 1.0
    return batch, prediction


def test_panel_has_a_tile_per_support_and_output():
    batch, prediction = one_episode(shot=2)
    panel = visualize.episode_panel(batch, prediction, prediction, prediction[:, 1])
    # supports, query label, pseudo mask, base model, EFTNet: 6 tiles of 24 px, 4 px gaps
    assert panel.shape == (18 + 24, 6 * 24 + 5 * 4, 3) and panel.dtype == np.uint8
    assert visualize.episode_panel(batch, prediction).shape[1] == 4 * 24 + 3 * 4


def test_stacking_command_writes_the_panels_one_above_the_other(tmp_path, capsys):
    paths = []
    for shot in (1, 1, 2):
        batch, prediction = one_episode(shot)
        paths.append(str(tmp_path / f"episode{len(paths)}.png"))
        cv2.imwrite(paths[-1], visualize.episode_panel(batch, prediction, prediction, prediction[:, 1]))
    out = tmp_path / "stacked.png"
    visualize.main([str(out), *paths[:2]])
    stacked, first = cv2.imread(str(out)), cv2.imread(paths[0])
    assert stacked.shape == (2 * first.shape[0] + 6, first.shape[1], 3)
    assert np.array_equal(stacked[:first.shape[0]], first) and (stacked[first.shape[0]:first.shape[0] + 6] == 255).all()
    for args, message in (([str(out), *paths], "panels of different widths"),
                          ([str(out), str(tmp_path / "none.png")], "none.png: not a readable image"),
                          ([str(tmp_path / "stacked.jpg"), paths[0]], "name it .png")):
        with pytest.raises(SystemExit) as exit_info:
            visualize.main(args)
        assert exit_info.value.code == 1 and message in capsys.readouterr().err
