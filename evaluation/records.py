"""Evaluation protocol: seeds, per-episode records, metrics rebuilt from records, tables.

Every finished episode becomes one JSON record holding its pixel counts, so that a killed
run resumes from its records and ends with exactly the numbers of an uninterrupted run,
and ranks under torchrun can sum what each of them evaluated.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch

from evaluation.analysis import round_fields
from evaluation.metrics import BaseClassMeter, FewShotMeter, episode_counts
from evaluation.tables import method_values, side_by_side

FIXED_SEED = 321  # EFTNet appends this seed to the drawn ones
DRAWN_SEEDS = 5


def evaluation_seeds(manual_seed: int, count: int) -> list[int]:
    """The reference's seeds: 5 draws of numpy's legacy RNG seeded with ``manual_seed``, then 321
    (PASCAL 123 -> 510 365 382 322 988 321). More than 6 draws more before the fixed seed."""
    rng = np.random.RandomState(manual_seed)
    drawn = [int(s) for s in rng.randint(0, 1000, max(DRAWN_SEEDS, count - 1))]
    seeds = drawn[:DRAWN_SEEDS] + [FIXED_SEED] + drawn[DRAWN_SEEDS:]
    return seeds[:count]


def per_round_mean(values: list[list[float]]) -> list[float]:
    """Mean of round r over the episodes that reached round r. Episodes that stopped early
    have shorter lists, so the lists are ragged and ``np.mean(values, 0)`` would fail."""
    length = max((len(v) for v in values), default=0)
    return [float(np.mean([v[r] for v in values if len(v) > r])) for r in range(length)]


def _counts(logits: torch.Tensor, label: torch.Tensor, classes: int) -> list[list[int]]:
    return [c.tolist() for c in episode_counts(logits, label, classes)]


def episode_record(index: int, batch: dict, zero, eft, num_base_classes: int,
                   gt_scores: Optional[list[float]] = None, label_free: bool = True) -> dict:
    """Counts of one episode for the base model (``zero``) and, if run, EFTNet (``eft``): also
    every round's counts (so that every selection rule can be measured on the same episodes) and
    the ground-truth s2q scores ``gt_scores`` when recorded; ``label_free`` says whether the
    engine's own scores used the pseudo label."""
    label, base_label = batch["query_mask_orig"][0], batch["query_base_orig"][0]
    record = {"episode": index, "class_idx": int(batch["class_idx"]),
              "zero": {"final": _counts(zero.final, label, 2), "meta": _counts(zero.meta, label, 2)},
              "base": _counts(zero.base, base_label, num_base_classes + 1)}
    if eft is not None:
        record["eftnet"] = {"final": _counts(eft.final, label, 2), "meta": _counts(eft.meta, label, 2)}
        record["rounds"] = {"scores": eft.round_scores, "chosen": eft.chosen_round, "losses": eft.losses,
                            "stopped_early": eft.stopped_early,
                            **round_fields(eft.rounds, label, gt_scores, label_free)}
    return record


def record_counts(counts: list[list[int]]) -> list[torch.Tensor]:
    """A record's (intersection, union, target) lists as float64 tensors for the meters."""
    return [torch.tensor(c, dtype=torch.float64) for c in counts]


class RecordFile:
    """Append-only JSON-lines file of episode records, flushed after each one."""

    def __init__(self, path: Path):
        self.path = path
        if path.exists() and path.stat().st_size:
            with open(path, "rb+") as f:  # end a line torn by a kill, so new records parse
                f.seek(-1, 2)
                if f.read(1) != b"\n":
                    f.write(b"\n")

    def append(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    @staticmethod
    def read_all(paths: Iterable[Path]) -> dict[int, dict]:
        """Records by episode index; a torn last line (killed mid-write) is skipped."""
        records = {}
        for path in paths:
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                records[record["episode"]] = record
        return records


class RunningMiou:
    """Class mIoU per method over the episodes seen so far (progress bar, TensorBoard)."""

    def __init__(self, num_novel: int):
        self.meters = {"zero": FewShotMeter(num_novel), "eftnet": FewShotMeter(num_novel)}
        self.seen: set[str] = set()

    def add(self, record: dict) -> None:
        for method, meter in self.meters.items():
            if method in record:
                meter.add(record["class_idx"], *record_counts(record[method]["final"]))
                self.seen.add(method)

    def values(self) -> dict[str, float]:
        return {method: meter.class_miou() for method, meter in self.meters.items() if method in self.seen}

    def postfix(self) -> dict[str, str]:
        return {method: f"{100 * value:.1f}" for method, value in self.values().items()}


class Scores:
    """Meters of one run (one seed) for the base model and EFTNet."""

    def __init__(self, num_novel: int, num_base: int):
        self.meters = {name: FewShotMeter(num_novel) for name in
                       ("zero_final", "zero_meta", "eftnet_final", "eftnet_meta")}
        self.base = BaseClassMeter(num_base)
        self.chosen: list[int] = []
        self.round_scores: list[list[float]] = []
        self.round_losses: list[list[float]] = []
        self.stopped_early = 0
        self.episodes = 0

    def add(self, record: dict) -> None:
        self.episodes += 1
        for method in ("zero", "eftnet"):
            for output in ("final", "meta"):
                if method in record:
                    self.meters[f"{method}_{output}"].add(record["class_idx"], *record_counts(record[method][output]))
        self.base.add(*record_counts(record["base"]))
        if "rounds" in record:
            self.chosen.append(record["rounds"]["chosen"])
            self.round_scores.append(record["rounds"]["scores"])
            self.round_losses.append(record["rounds"]["losses"])
            self.stopped_early += int(record["rounds"]["stopped_early"])

    def all_reduce(self) -> None:
        for meter in (*self.meters.values(), self.base):
            meter.all_reduce()

    def summary(self, with_eftnet: bool) -> dict:
        out = {"episodes": self.episodes, "base_miou": self.base.miou()}
        methods = ("zero", "eftnet") if with_eftnet else ("zero",)
        for method in methods:
            final, meta = self.meters[f"{method}_final"], self.meters[f"{method}_meta"]
            out[method] = {"miou": final.class_miou(), "fbiou": final.fb_iou(), "fg_iou": final.fg_iou(),
                           "miou_meta": meta.class_miou(), "fbiou_meta": meta.fb_iou(),
                           "class_iou": final.class_iou().tolist(),
                           "episodes_per_class": final.episodes_per_class.tolist()}
        if with_eftnet:
            out["stopped_early"] = self.stopped_early
        return out

    def seed_summary(self, with_eftnet: bool, rounds: int) -> dict:
        """What results.json keeps of one seed: ``summary`` plus the mean s2q score of each
        round and how often each round was chosen."""
        out = self.summary(with_eftnet)
        out["mean_round_scores"] = per_round_mean(self.round_scores)
        out["chosen_rounds"] = np.bincount(self.chosen, minlength=rounds + 1)[1:].tolist() if self.chosen else []
        return out


def method_means(per_seed: dict[int, dict], with_eftnet: bool) -> dict[str, dict[str, float]]:
    """Mean and best over seeds of each method's class mIoU and FB-IoU."""
    means = {}
    for method in ("zero", "eftnet") if with_eftnet else ("zero",):
        values = np.array([[s[method]["miou"], s[method]["fbiou"]] for s in per_seed.values()])
        means[method] = {"miou_mean": values[:, 0].mean(), "fbiou_mean": values[:, 1].mean(),
                         "miou_best": values[:, 0].max(), "fbiou_best": values[:, 1].max()}
    return means


def format_table(per_seed: dict[int, dict], with_eftnet: bool) -> str:
    """Per-seed rows plus mean and best, in percent: base model vs EFTNet and the difference,
    and the base learner's base-class mIoU."""
    rows = [(str(seed), method_values(s, with_eftnet) + [100 * s["base_miou"]]) for seed, s in per_seed.items()]
    return side_by_side("seed", rows, with_eftnet, extra="base-cls mIoU", totals=("mean", "best"))
