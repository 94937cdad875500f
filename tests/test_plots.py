"""evaluation/plots.py: every plot writes a non-empty PNG and returns the same picture as uint8 pixels."""
import numpy as np
import pytest

from evaluation import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def check(path, image: np.ndarray) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5000
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert image.shape[0] > 100 and image.shape[1] > 100
    assert image.std() > 0  # something was drawn
    assert not list(path.parent.glob("*.tmp*"))  # written atomically: no temporary left


@pytest.mark.parametrize("gt", [True, False])
def test_every_plot_writes_a_png(tmp_path, gt):
    rng = np.random.default_rng(0)
    check(tmp_path / "round_iou.png",
          plots.round_iou(tmp_path / "round_iou.png", [45.0, 46.1, 46.8, 47.0, 46.5, 46.2],
                          {"s2q": 46.9, "s2q_gt": 47.3, "oracle": 52.0}))
    pseudo = [0.61, 0.63, 0.64, 0.64, 0.63]
    check(tmp_path / "scores.png",
          plots.round_scores(tmp_path / "scores.png", pseudo, [0.6, 0.64, 0.66, 0.65, 0.64] if gt else None))
    check(tmp_path / "chosen.png",
          plots.chosen_rounds(tmp_path / "chosen.png", {"s2q": [0, 10, 5, 3, 2, 30], "oracle": [0, 20, 5, 5, 10, 10]}))
    check(tmp_path / "gains.png", plots.gain_histogram(tmp_path / "gains.png", rng.normal(1.0, 5.0, 300)))
    scores, ious = rng.uniform(0.3, 0.9, 500), rng.uniform(0.1, 0.9, 500)
    check(tmp_path / "scatter.png",
          plots.score_vs_iou(tmp_path / "scatter.png", scores, ious, scores * 0.9 if gt else None))


def test_degenerate_inputs_still_plot(tmp_path):
    check(tmp_path / "g.png", plots.gain_histogram(tmp_path / "g.png", np.zeros(5)))
    check(tmp_path / "s.png", plots.score_vs_iou(tmp_path / "s.png", [0.5] * 4, [0.2, 0.3, 0.4, 0.5]))
    assert plots._correlation(np.array([0.5, 0.5]), np.array([0.1, 0.2])) == "n/a"
    assert plots._correlation(np.array([0.1, 0.2, 0.3]), np.array([0.2, 0.4, 0.6])) == "1.00"


def test_existing_file_is_replaced(tmp_path):
    path = tmp_path / "sub" / "gains.png"
    path.parent.mkdir()
    path.write_bytes(b"old")
    plots.gain_histogram(path, [1.0, -1.0, 2.0])
    assert path.read_bytes().startswith(PNG_MAGIC)
