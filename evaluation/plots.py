"""PNG plots of a meta-test run: rounds, scores, selection rules and gains.

Each function takes plain arrays and a path, writes the PNG atomically (a kill leaves the old
file or the new one) and returns the picture as an [H, W, 3] uint8 array, ready for
``SummaryWriter.add_image(..., dataformats="HWC")``. Figures are built on matplotlib's Agg
canvas directly, not through pyplot, so no global figure state or display is involved and
plotting from a worker thread or a headless machine is safe.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: never try to open a window
import numpy as np  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

SIZE = (6.4, 4.0)  # inches; at DPI 100 a 640 x 400 picture
DPI = 100


def _new() -> tuple[Figure, "matplotlib.axes.Axes"]:
    figure = Figure(figsize=SIZE, dpi=DPI)
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot(1, 1, 1)


def _finish(figure: Figure, path: str | Path) -> np.ndarray:
    """Save ``figure`` to ``path`` atomically and return its pixels as [H, W, 3] uint8."""
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    figure.savefig(tmp, format="png", dpi=DPI)
    os.replace(tmp, path)
    figure.canvas.draw()
    return np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()


def _finish_line_plot(figure: Figure, ax, path: str | Path, xlabel: str, ylabel: str, title: str) -> np.ndarray:
    """Axis labels, title, light grid and legend of a line or scatter plot, then ``_finish``."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _finish(figure, path)


def round_iou(path: str | Path, per_round: Sequence[float], marks: Mapping[str, float],
              ylabel: str = "class mIoU (%)") -> np.ndarray:
    """Mean query IoU of rounds 0 (zero round) .. N as a line, and each selection rule's value
    (``marks``: e.g. s2q, s2q with ground truth, oracle) as a dashed horizontal line."""
    figure, ax = _new()
    rounds = np.arange(len(per_round))
    ax.plot(rounds, per_round, marker="o", color="black", label="fixed round")
    colours = matplotlib.colormaps["tab10"]
    for i, (name, value) in enumerate(marks.items()):
        ax.axhline(value, linestyle="--", color=colours(i), label=f"{name} ({value:.2f})")
    ax.set_xticks(rounds)
    ax.set_xticklabels(["zero"] + [str(r) for r in rounds[1:]])
    return _finish_line_plot(figure, ax, path, "round", ylabel, "query IoU per fine-tuning round")


def round_scores(path: str | Path, pseudo: Optional[Sequence[float]],
                 ground_truth: Optional[Sequence[float]] = None) -> np.ndarray:
    """Mean s2q score of rounds 1..N with the query's pseudo label and with its ground truth,
    each when recorded."""
    figure, ax = _new()
    rounds = np.arange(1, max(len(pseudo or []), len(ground_truth or [])) + 1)
    if pseudo is not None:
        ax.plot(np.arange(1, len(pseudo) + 1), pseudo, marker="o", label="query pseudo label (label-free)")
    if ground_truth is not None:
        ax.plot(np.arange(1, len(ground_truth) + 1), ground_truth, marker="s",
                label="query ground truth (reads labels)")
    ax.set_xticks(rounds)
    return _finish_line_plot(figure, ax, path, "round", "mean s2q score (support IoU)", "s2q score per round")


def chosen_rounds(path: str | Path, histograms: Mapping[str, Sequence[int]]) -> np.ndarray:
    """Grouped bars: how often each rule chose round 0 (zero) .. N (``histograms[rule][r]``)."""
    figure, ax = _new()
    names = list(histograms)
    length = max((len(h) for h in histograms.values()), default=1)
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        counts = np.zeros(length)
        counts[:len(histograms[name])] = histograms[name]
        ax.bar(np.arange(length) + (i - (len(names) - 1) / 2) * width, counts, width, label=name)
    ax.set_xticks(np.arange(length))
    ax.set_xticklabels(["zero"] + [str(r) for r in range(1, length)])
    ax.set_xlabel("chosen round")
    ax.set_ylabel("episodes")
    ax.set_title("chosen round per selection rule")
    ax.legend(fontsize=8)
    return _finish(figure, path)


def gain_histogram(path: str | Path, gains: Sequence[float], label: str = "EFTNet - zero round") -> np.ndarray:
    """Histogram of per-episode foreground IoU gains (in IoU points), zero marked."""
    gains = np.asarray(gains, dtype=np.float64)
    figure, ax = _new()
    ax.hist(gains, bins=41, color="tab:blue", alpha=0.8)
    ax.axvline(0.0, color="black", linewidth=1)
    if gains.size:
        ax.axvline(float(gains.mean()), color="tab:red", linestyle="--", label=f"mean {gains.mean():+.2f}")
        ax.legend(fontsize=8)
    ax.set_xlabel(f"per-episode foreground IoU gain ({label})")
    ax.set_ylabel("episodes")
    ax.set_title(f"{np.mean(gains > 0) if gains.size else 0:.0%} improved, "
                 f"{np.mean(gains < 0) if gains.size else 0:.0%} worsened")
    return _finish(figure, path)


def score_vs_iou(path: str | Path, scores: Sequence[float], ious: Sequence[float],
                 gt_scores: Optional[Sequence[float]] = None, label: str = "pseudo label") -> np.ndarray:
    """Scatter of the s2q score (computed with the query's ``label``) against the query's
    foreground IoU, one point per round and episode; with ``gt_scores``, the ground-truth scores
    of the same points beside them."""
    scores, ious = np.asarray(scores, dtype=np.float64), np.asarray(ious, dtype=np.float64)
    figure, ax = _new()
    ax.scatter(scores, ious, s=6, alpha=0.4, label=f"{label} (r = {_correlation(scores, ious)})")
    if gt_scores is not None:
        gt_scores = np.asarray(gt_scores, dtype=np.float64)
        ax.scatter(gt_scores, ious, s=6, alpha=0.4, marker="x",
                   label=f"ground truth (r = {_correlation(gt_scores, ious)})")
    return _finish_line_plot(figure, ax, path, "s2q score", "query foreground IoU",
                             "does the s2q score track query quality?")


def _correlation(x: np.ndarray, y: np.ndarray) -> str:
    """Pearson correlation as text; 'n/a' when either side is constant or too short."""
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if x.size < 2 or x.std() == 0 or y.std() == 0:
        return "n/a"
    return f"{np.corrcoef(x, y)[0, 1]:.2f}"
