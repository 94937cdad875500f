"""Published class-mIoU numbers of the base models and EFTNet, and a table of ours beside them.

Numbers are in percent, per fold (0..3) and the mean over the four folds, as the papers and
READMEs report them. Where they come from (docs/reference_behaviour.md, section 4, and
section 3.4 for the checkpoint file names):

- ``paper``: the mean stated in the method's README or paper; per-fold values only where a
  source states them or they were taken from the paper tables (marked "recalled": these were
  not re-read from the PDF and should be checked against it before being quoted).
- ``checkpoint``: MSANet's released files carry their own validation mIoU in their names
  (``resnet50_0_0.6925.pth``); that is what the zero round with those files should roughly
  reproduce, and it is not always the paper's table (COCO ResNet-50: the file names average
  49.00, the paper says 48.03).
- EFTNet: the means over the four folds in EFTNet's README, per base model, backbone and shot;
  the README gives no per-fold values. The reference's round selection reads the query's
  ground truth, so these numbers correspond to ``s2q_query_mask: ground_truth``, not to the
  label-free default.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

FOLDS = (0, 1, 2, 3)
MISSING = "-"


@dataclass(frozen=True)
class Published:
    """One published row: per-fold values (None where not published) and the stated mean."""

    method: str
    kind: str                                  # "paper" or "checkpoint"
    folds: tuple[Optional[float], ...]
    mean: Optional[float]
    source: str


def _row(method: str, kind: str, folds: Sequence[Optional[float]] | None, mean: Optional[float],
         source: str) -> Published:
    folds = tuple(folds) if folds is not None else (None,) * len(FOLDS)
    return Published(method, kind, folds, mean, source)


_README = "README mean"
_RECALLED = "README mean; folds recalled from the paper table (check the PDF)"
_FILES = "released checkpoint file names (MSANet's own validation)"
_HSNET = "mean as the BAM and MSANet READMEs quote it; folds recalled from the HSNet paper table (check the PDF)"
_HSNET_ALL = "mean and folds recalled from the HSNet paper table (check the PDF)"

# (data_set, method, backbone, shot) -> rows. data_set as in the configs: pascal / coco.
PUBLISHED: dict[tuple[str, str, str, int], list[Published]] = {
    ("pascal", "MSANet", "resnet50", 1): [
        _row("MSANet", "paper", (69.25, 74.60, 67.84, 62.40), 68.52,
             "README mean; folds from the released checkpoint file names, which average to it")],
    ("pascal", "MSANet", "resnet50", 5): [_row("MSANet", "paper", None, 72.60, _README)],
    ("pascal", "MSANet", "resnet101", 1): [
        _row("MSANet", "paper", None, 69.13, _README),
        _row("MSANet", "checkpoint", (70.95, 75.29, 66.68, 64.37), None, _FILES)],
    ("pascal", "MSANet", "resnet101", 5): [_row("MSANet", "paper", None, 73.99, _README)],
    ("pascal", "MSANet", "vgg", 1): [
        _row("MSANet", "paper", (64.87, 71.47, 67.40, 59.33), 65.76,
             "README mean; folds from the released checkpoint file names (average 65.77)")],
    ("pascal", "MSANet", "vgg", 5): [
        _row("MSANet", "paper", None, 70.40, _README),
        _row("MSANet", "checkpoint", (68.86, 74.03, 72.48, 64.70), None, _FILES + ", from the config comments")],
    ("coco", "MSANet", "resnet50", 1): [
        _row("MSANet", "paper", None, 48.03, _README),
        _row("MSANet", "checkpoint", (48.34, 54.95, 47.39, 45.33), None, _FILES)],
    ("coco", "MSANet", "resnet50", 5): [
        _row("MSANet", "paper", None, 53.67, _README),
        _row("MSANet", "checkpoint", (53.51, 61.09, 51.17, 50.93), None, _FILES)],
    ("coco", "MSANet", "resnet101", 1): [
        _row("MSANet", "paper", None, 51.09, _README),
        _row("MSANet", "checkpoint", (48.46, 57.71, 49.85, 48.09), None, _FILES)],
    ("coco", "MSANet", "resnet101", 5): [
        _row("MSANet", "paper", None, 56.80, _README),
        _row("MSANet", "checkpoint", (55.10, 61.79, 52.97, 57.02), None, _FILES)],
    ("coco", "MSANet", "vgg", 1): [_row("MSANet", "checkpoint", (40.60, 49.00, 47.19, 43.61), None, _FILES)],
    ("coco", "MSANet", "vgg", 5): [_row("MSANet", "checkpoint", (47.15, 56.86, 50.49, 49.09), None, _FILES)],
    ("pascal", "BAM", "vgg", 1): [_row("BAM", "paper", (63.18, 70.77, 66.14, 57.53), 64.41, _RECALLED)],
    ("pascal", "BAM", "vgg", 5): [_row("BAM", "paper", (67.36, 73.05, 70.61, 64.00), 68.76, _RECALLED)],
    ("pascal", "BAM", "resnet50", 1): [
        _row("BAM", "paper", (68.97, 73.59, 67.55, 61.13), 67.81, "README mean; folds stated by the author (BAM issue 33)")],
    ("pascal", "BAM", "resnet50", 5): [_row("BAM", "paper", (70.59, 75.05, 70.79, 67.20), 70.91, _RECALLED)],
    ("coco", "BAM", "vgg", 1): [_row("BAM", "paper", (38.96, 47.04, 46.41, 41.57), 43.50, _RECALLED)],
    ("coco", "BAM", "vgg", 5): [_row("BAM", "paper", (47.02, 52.62, 48.59, 49.11), 49.34, _RECALLED)],
    ("coco", "BAM", "resnet50", 1): [_row("BAM", "paper", (43.41, 50.59, 47.49, 43.42), 46.23, _RECALLED)],
    ("coco", "BAM", "resnet50", 5): [_row("BAM", "paper", (49.26, 54.20, 51.63, 49.55), 51.16, _RECALLED)],
    # HSNet (Min et al., ICCV 2021) under its own protocol: 400 x 400 images and labels, 1,000
    # episodes, seed 0; its K-shot rows vote with the 1-shot models.
    ("pascal", "HSNet", "vgg", 1): [_row("HSNet", "paper", (59.6, 65.7, 59.6, 54.0), 59.7, _HSNET)],
    ("pascal", "HSNet", "vgg", 5): [_row("HSNet", "paper", (64.9, 69.0, 64.1, 58.6), 64.1, _HSNET)],
    ("pascal", "HSNet", "resnet50", 1): [_row("HSNet", "paper", (64.3, 70.7, 60.3, 60.5), 64.0, _HSNET)],
    ("pascal", "HSNet", "resnet50", 5): [_row("HSNet", "paper", (70.3, 73.2, 67.4, 67.1), 69.5, _HSNET)],
    ("pascal", "HSNet", "resnet101", 1): [_row("HSNet", "paper", (67.3, 72.3, 62.0, 63.1), 66.2, _HSNET_ALL)],
    ("pascal", "HSNet", "resnet101", 5): [_row("HSNet", "paper", (71.8, 74.4, 67.0, 68.3), 70.4, _HSNET_ALL)],
    ("coco", "HSNet", "resnet50", 1): [_row("HSNet", "paper", (36.3, 43.1, 38.7, 38.7), 39.2, _HSNET)],
    ("coco", "HSNet", "resnet50", 5): [_row("HSNet", "paper", (43.3, 51.3, 48.2, 45.0), 46.9, _HSNET)],
    ("coco", "HSNet", "resnet101", 1): [_row("HSNet", "paper", (37.2, 44.1, 42.4, 41.3), 41.2, _HSNET)],
    ("coco", "HSNet", "resnet101", 5): [_row("HSNet", "paper", (45.9, 53.0, 51.8, 47.1), 49.5, _HSNET)],
}

_EFTNET = "EFTNet README mean over the four folds (no per-fold values published)"

# (data_set, base model, backbone, shot) -> EFTNet's row: on PASCAL it runs on MSANet; on COCO on
# MSANet for the ResNets and on BAM for VGG16.
EFTNET_PUBLISHED: dict[tuple[str, str, str, int], Published] = {
    key: _row("EFTNet", "paper", None, mean, _EFTNET) for key, mean in {
        ("pascal", "MSANet", "vgg", 1): 66.86, ("pascal", "MSANet", "vgg", 5): 71.07,
        ("pascal", "MSANet", "resnet50", 1): 70.01, ("pascal", "MSANet", "resnet50", 5): 73.64,
        ("pascal", "MSANet", "resnet101", 1): 70.64, ("pascal", "MSANet", "resnet101", 5): 74.88,
        ("coco", "BAM", "vgg", 1): 48.13, ("coco", "BAM", "vgg", 5): 53.28,
        ("coco", "MSANet", "resnet50", 1): 50.67, ("coco", "MSANet", "resnet50", 5): 56.21,
        ("coco", "MSANet", "resnet101", 1): 54.09, ("coco", "MSANet", "resnet101", 5): 59.13,
    }.items()}

# The reference selects EFTNet's round with the query's labels; a label-free run is not its match.
QUERY_LABELS_NOTE = "* EFTNet, paper: the reference's round selection reads the query's labels"


def published(data_set: str, arch: str, backbone: str, shot: int) -> list[Published]:
    """The published base-model rows of a setting; [] for settings without any (e.g. the demo)."""
    return list(PUBLISHED.get((data_set, arch, backbone, int(shot)), []))


def eftnet_published(data_set: str, arch: str, backbone: str, shot: int) -> Optional[Published]:
    """EFTNet's published row on base model ``arch`` (mean over folds only); None where the
    README has none (e.g. PASCAL on BAM)."""
    return EFTNET_PUBLISHED.get((data_set, arch, backbone, int(shot)))


def _query_labels_note(query_mask: Optional[str]) -> str:
    """Whether the run compared with EFTNet's paper row selected its rounds as the reference does."""
    if query_mask == "ground_truth":
        return f"{QUERY_LABELS_NOTE}, as this run does (s2q_query_mask: ground_truth): the comparable run"
    if query_mask == "pseudo":
        return (f"{QUERY_LABELS_NOTE}; this run is label-free (s2q_query_mask: pseudo), not comparable: "
                "the comparable run is s2q_query_mask: ground_truth")
    return f"{QUERY_LABELS_NOTE}; the comparable run is s2q_query_mask: ground_truth"


def _cell(value: Optional[float], signed: bool = False) -> str:
    if value is None:
        return f"{MISSING:>7}"
    return f"{value:+7.2f}" if signed else f"{value:7.2f}"


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    """Mean over the four folds, only when all four are present (a partial mean is another number)."""
    return None if any(v is None for v in values) else sum(values) / len(values)


def comparison_table(data_set: str, arch: str, backbone: str, shot: int,
                     ours: Mapping[int, Mapping[str, float]],
                     fold_intervals: Optional[Mapping[int, Sequence[float]]] = None,
                     mean_interval: Optional[Sequence[float]] = None,
                     query_mask: Optional[str] = None) -> str:
    """Ours beside the published class mIoU of a setting, in percent: the base model's paper
    (and checkpoint-name) rows, EFTNet's paper row where its README has one, and ours.

    The mean interval is the paired bootstrap over folds (``evaluation.bootstrap.pooled_over_folds``),
    not a mean of the fold intervals.

    ``ours[fold]`` holds ``zero`` and, if EFTNet ran, ``eftnet`` (fractions, as results.json);
    ``fold_intervals[fold]`` and ``mean_interval`` are our paired intervals of the gain
    EFTNet - zero (fractions); ``query_mask`` is the run's ``s2q_query_mask`` (None if unknown),
    which says whether our EFTNet row selected its rounds as EFTNet's paper row did. Folds not
    run show as missing; our mean, and every difference with a published mean, are shown only
    when all four folds ran.
    """
    def ours_row(key: str) -> list[Optional[float]]:
        return [100 * ours[f][key] if f in ours and key in ours[f] else None for f in FOLDS]

    def versus(mine: list[Optional[float]], that: Published,
               mean: Optional[float]) -> tuple[str, list[Optional[float]], Optional[float], bool]:
        diff = [None if a is None or b is None else a - b for a, b in zip(mine, that.folds)]
        mine_mean = _mean(mine)
        return "  ours - that", diff, None if mine_mean is None or mean is None else mine_mean - mean, True

    rows: list[tuple[str, list[Optional[float]], Optional[float], bool]] = []
    zero = ours_row("zero")
    rows.append((f"ours: {arch} (zero round)", zero, _mean(zero), False))
    base_paper = None
    for entry in published(data_set, arch, backbone, shot):
        label = f"{entry.method}, {'paper' if entry.kind == 'paper' else 'checkpoint name'}"
        mean = entry.mean if entry.mean is not None else _mean(entry.folds)
        if entry.kind == "paper" and base_paper is None:
            base_paper = mean
        rows.append((label, list(entry.folds), mean, False))
        rows.append(versus(zero, entry, mean))
    with_eftnet = any("eftnet" in v for v in ours.values())
    eft = ours_row("eftnet")
    if with_eftnet:
        rows.append(("ours: EFTNet", eft, _mean(eft), False))
    paper = eftnet_published(data_set, arch, backbone, shot)
    if paper is not None:
        rows.append(("EFTNet, paper *", list(paper.folds), paper.mean, False))
        if with_eftnet:
            rows.append(versus(eft, paper, paper.mean))
        if base_paper is not None:
            rows.append((f"EFTNet, paper - {arch}, paper", [None] * len(FOLDS), paper.mean - base_paper, True))
    if with_eftnet:
        gain = [None if a is None or b is None else a - b for a, b in zip(eft, zero)]
        rows.append(("ours: EFTNet - zero", gain, _mean(gain), True))
        if fold_intervals or mean_interval:
            # The interval as two rows under the gain, so every cell stays in its fold's column.
            for side, name in ((0, "  95% interval, low"), (1, "  95% interval, high")):
                values = [100 * fold_intervals[f][side] if fold_intervals and f in fold_intervals else None
                          for f in FOLDS]
                rows.append((name, values, None if mean_interval is None else 100 * mean_interval[side], True))

    label_width = max(len(r[0]) for r in rows)
    head = f"{'':<{label_width}} | " + " ".join(f"{'fold ' + str(f):>7}" for f in FOLDS) + f" | {'mean':>7}"
    lines = [f"{data_set} {arch} {backbone} {shot}-shot: class mIoU (%), ours beside the published numbers",
             head, "-" * len(head)]
    for label, values, mean, signed in rows:
        lines.append(f"{label:<{label_width}} | " + " ".join(_cell(v, signed) for v in values)
                     + f" | {_cell(mean, signed)}")
    missing = [f for f in FOLDS if f not in ours]
    if missing:
        lines.append(f"folds not run: {', '.join(map(str, missing))} (shown as {MISSING}; no mean without all four)")
    if not published(data_set, arch, backbone, shot):
        lines.append(f"no published {arch} numbers for {data_set} {backbone} {shot}-shot")
    if paper is not None:
        lines.append(_query_labels_note(query_mask if with_eftnet else None))
    for entry in published(data_set, arch, backbone, shot) + ([paper] if paper is not None else []):
        lines.append(f"{entry.method}, {'paper' if entry.kind == 'paper' else 'checkpoint name'}: {entry.source}")
    return "\n".join(lines)
