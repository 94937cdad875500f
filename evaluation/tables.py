"""One table layout for the base model beside EFTNet: a run's seeds, a summary's folds."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

TOTALS = {"mean": np.mean, "best": np.max}


def side_by_side(label: str, rows: Sequence[tuple[str, Sequence[float]]], with_eftnet: bool,
                 extra: Optional[str] = None, totals: Sequence[str] = ("mean",)) -> str:
    """Rows of percentages: class mIoU and FB-IoU of the base model, then (``with_eftnet``) of
    EFTNet and the differences, then the column ``extra`` when named (each row's last value);
    after a rule, the ``totals`` ("mean", "best") over the rows."""
    width = max(len(label), *(len(name) for name, _ in rows), *(len(total) for total in totals))
    head = f"{label:>{width}} | {'mIoU base':>9} {'FB-IoU base':>11}"
    if with_eftnet:
        head += f" | {'mIoU EFTNet':>11} {'FB-IoU EFTNet':>13} | {'dmIoU':>6} {'dFB-IoU':>7}"
    if extra:
        head += f" | {extra:>13}"

    def line(name: str, v: Sequence[float]) -> str:
        text = f"{name:>{width}} | {v[0]:9.2f} {v[1]:11.2f}"
        if with_eftnet:
            text += f" | {v[2]:11.2f} {v[3]:13.2f} | {v[2] - v[0]:+6.2f} {v[3] - v[1]:+7.2f}"
        return text + (f" | {v[-1]:13.2f}" if extra else "")

    values = np.array([list(v) for _, v in rows], dtype=np.float64)
    lines = [head, "-" * len(head), *(line(name, v) for name, v in rows), "-" * len(head)]
    lines += [line(total, list(TOTALS[total](values, axis=0))) for total in totals]
    return "\n".join(lines)


def method_values(entry: dict, with_eftnet: bool, suffix: str = "") -> list[float]:
    """mIoU and FB-IoU of the base model (``zero``) and EFTNet in percent, from a seed summary
    (``suffix`` "") or a results.json (``suffix`` "_mean")."""
    methods = ("zero", "eftnet") if with_eftnet else ("zero",)
    return [100 * entry[m][f"{key}{suffix}"] for m in methods for key in ("miou", "fbiou")]
