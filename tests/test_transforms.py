import numpy as np
import pytest
import torch

from dataset.transforms import MEAN, STD, padding_map, resized_hw, transform_image, transform_label


@pytest.mark.parametrize("h, w, size, expected", [
    (375, 500, 473, (352, 472)),   # 473 * 375 / 500 = 354.75 -> 354 -> 352
    (338, 500, 473, (312, 472)),   # 319.7 -> 319 -> 312
    (500, 375, 473, (472, 352)),
    (500, 500, 473, (472, 472)),
    (480, 640, 641, (480, 640)),   # 641 -> 640, 480.75 -> 480
    (427, 640, 641, (424, 640)),   # 427.66 -> 427 -> 424
    (100, 50, 121, (120, 56)),     # 60.5 -> 60 -> 56
    (20, 30, 473, (312, 472)),     # small images are scaled up
])
def test_resized_hw(h, w, size, expected):
    assert resized_hw(h, w, size) == expected


def test_resized_hw_rejects_degenerate():
    with pytest.raises(ValueError, match="9x800"):
        resized_hw(9, 800, 473)


def test_transform_image_pads_top_left_and_normalises():
    image = np.full((30, 40, 3), 100.0, np.float32)
    image[..., 2] = 200.0
    out = transform_image(image, 49)            # -> 32 x 48 (36.75 -> 36 -> 32)
    assert out.shape == (3, 49, 49) and out.dtype == torch.float32
    mean, std = torch.tensor(MEAN), torch.tensor(STD)
    inside = torch.tensor([100.0, 100.0, 200.0])
    torch.testing.assert_close(out[:, 31, 47], (inside - mean) / std)
    torch.testing.assert_close(out[:, 32, 0], -mean / std)   # padding = black before normalising
    torch.testing.assert_close(out[:, 0, 48], -mean / std)
    assert MEAN == pytest.approx([123.675, 116.28, 103.53])
    assert STD == pytest.approx([58.395, 57.12, 57.375])


def test_transform_label_nearest_and_255_padding():
    label = np.zeros((4, 6), np.uint8)
    label[:2, :3] = 7
    label[3, 5] = 255
    out = transform_label(label, 25)            # 6 -> 25 -> 24 wide, 4 -> 16 high
    assert out.shape == (25, 25) and out.dtype == torch.int64
    assert set(out.unique().tolist()) == {0, 7, 255}   # nearest: no new values
    assert (out[:8, :12] == 7).all() and (out[8:16, 12:20] == 0).all()
    assert (out[12:16, 20:24] == 255).all()
    assert (out[16:, :] == 255).all() and (out[:, 24] == 255).all()


def test_padding_map_matches_resized_size():
    pad = padding_map(375, 500, 473)
    assert pad.dtype == torch.bool and pad.shape == (473, 473)
    assert not pad[:352, :472].any()
    assert pad[352:, :].all() and pad[:, 472:].all()
    assert int((~pad).sum()) == 352 * 472
