"""Every selection rule of a run, from its episode records: numbers, paired intervals, table, plots.

Each EFTNet episode record holds, in ``record["rounds"]`` (``evaluation.records.round_fields``),
the counts of every round's query prediction against the label (``counts``, computed by the
evaluator at original resolution, like the other counts) and, when asked, the ground-truth s2q
scores (``gt_scores``, from the engine's observer probe). From those, ``analyse`` applies each
rule of ``evaluation.selection`` to the same episodes, measures it like the base model (class mIoU, FB-IoU),
and compares it with the zero round by the paired bootstrap of ``evaluation.bootstrap``: per seed,
and pooled over seeds (each seed resampled within itself).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import torch

from evaluation.bootstrap import (DEFAULT_DRAWS, DEFAULT_SEED, EpisodeCounts, concat, paired_bootstrap,
                                  pooled_over_folds, pooled_over_seeds)
from evaluation.metrics import EPS
from evaluation.records import per_round_mean
from evaluation.selection import ORACLE, S2Q, S2Q_GT, ZERO, EpisodeRounds, round_counts, select_all
from model.round_selection import S2Q_STOP, S2Q_VOTE, SOFT_VOTE, STOP_VOTE

COUNTS_FILE = "episode_counts.json"  # beside results.json: what the fold summary's intervals need
PLOTTED_RULES = (S2Q, S2Q_GT, ORACLE)


class GroundTruthScores:
    """The observer that records each round's s2q score with the query's ground truth (the
    reference's selection) while the engine itself runs label-free: the evaluator holds the
    label and asks the probe, the engine never receives it."""

    def __init__(self, query_mask: torch.Tensor):
        self.query_mask = query_mask
        self.scores: list[float] = []

    def __call__(self, probe) -> None:
        self.scores.append(float(probe.s2q_score(self.query_mask)))


def episode_rounds(record: dict) -> EpisodeRounds:
    """A record's rounds for the selection rules (a record written before per-round counts
    existed cannot be analysed: KeyError naming the field)."""
    rounds = record["rounds"]
    if "counts" not in rounds:
        raise KeyError("episode record without per-round counts (written by an older version): rerun with --restart")
    scores = rounds["scores"] if rounds.get("label_free", True) else None
    return EpisodeRounds(record["zero"]["final"], rounds["counts"], scores, rounds.get("gt_scores"),
                         rounds.get("votes"))


def _summary(counts: EpisodeCounts) -> dict:
    return {"miou": counts.class_miou(), "fbiou": counts.fb_iou()}


def _as_counts(class_idx: np.ndarray, selection_counts: np.ndarray, num_classes: int) -> EpisodeCounts:
    return EpisodeCounts.from_counts(class_idx, selection_counts, num_classes)


def analyse_seed(records: Sequence[dict], num_classes: int, num_rounds: int, draws: int = DEFAULT_DRAWS,
                 seed: int = DEFAULT_SEED) -> dict:
    """Rules of one seed's records: per rule its numbers, its chosen-round histogram and its
    paired comparison with the zero round. Also kept (under ``_``, not for JSON): the
    per-episode counts of each rule, for pooling and plots."""
    if not records:
        raise ValueError("no episode records to analyse")
    episodes = [episode_rounds(r) for r in records]
    with_gt = all(e.gt_scores is not None for e in episodes)
    label_free = all(e.scores is not None for e in episodes)
    class_idx = np.array([r["class_idx"] for r in records], dtype=np.int64)
    selected = select_all(episodes, num_rounds, with_gt, label_free)
    counts = {name: _as_counts(class_idx, s.counts, num_classes) for name, s in selected.items()}
    rules = {}
    for name, selection in selected.items():
        entry = {**_summary(counts[name]), "reads_labels": selection.rule.reads_labels,
                 "description": selection.rule.description, "chosen_rounds": selection.histogram(num_rounds)}
        if name != ZERO:
            entry["vs_zero"] = paired_bootstrap(counts[name], counts[ZERO], draws, seed).to_dict()
        if name not in (ZERO, S2Q) and S2Q in counts:
            entry["vs_s2q"] = paired_bootstrap(counts[name], counts[S2Q], draws, seed).to_dict()
        rules[name] = entry
    per_round = round_counts(episodes, num_rounds)
    return {"episodes": len(records), "with_gt_scores": with_gt, "with_label_free_scores": label_free, "rules": rules,
            "round_miou": [EpisodeCounts.from_counts(class_idx, per_round[:, r], num_classes).class_miou()
                           for r in range(num_rounds + 1)],
            "_": {"counts": counts, "selected": selected, "episodes": episodes, "per_round": per_round,
                  "class_idx": class_idx}}


def analyse_pooled(per_seed: Mapping[int, dict], num_classes: int, num_rounds: int, draws: int = DEFAULT_DRAWS,
                   seed: int = DEFAULT_SEED) -> dict:
    """All seeds of the fold as one sample (counts summed; each seed resampled within itself)."""
    analyses = list(per_seed.values())
    names = [n for n in analyses[0]["rules"] if all(n in a["rules"] for a in analyses)]
    rules = {}
    for name in names:
        counts = concat([a["_"]["counts"][name] for a in analyses])
        first = analyses[0]["rules"][name]
        entry = {**_summary(counts), "reads_labels": first["reads_labels"], "description": first["description"],
                 "chosen_rounds": np.sum([a["rules"][name]["chosen_rounds"] for a in analyses], 0).tolist()}
        for against in (ZERO, S2Q):
            if name not in (ZERO, against) and against in names:
                pairs = [(a["_"]["counts"][name], a["_"]["counts"][against]) for a in analyses]
                entry[f"vs_{against}"] = pooled_over_seeds(pairs, draws, seed).to_dict()
        rules[name] = entry
    class_idx = np.concatenate([a["_"]["class_idx"] for a in analyses])
    per_round = np.concatenate([a["_"]["per_round"] for a in analyses])
    return {"episodes": int(class_idx.shape[0]), "seeds": len(analyses),
            "with_gt_scores": all(a["with_gt_scores"] for a in analyses),
            "with_label_free_scores": all(a["with_label_free_scores"] for a in analyses), "rules": rules,
            "round_miou": [EpisodeCounts.from_counts(class_idx, per_round[:, r], num_classes).class_miou()
                           for r in range(num_rounds + 1)]}


def public(analysis: dict) -> dict:
    """The JSON-able part of an analysis (without the per-episode arrays)."""
    return {k: v for k, v in analysis.items() if k != "_"}


def rule_label(name: str, entry: dict) -> str:
    names = {ZERO: "zero round (base model)", S2Q: "EFTNet s2q, label-free", S2Q_GT: "EFTNet s2q, query GT",
             "last": "last round", ORACLE: "oracle round", S2Q_STOP: "s2q with a stop",
             SOFT_VOTE: "soft vote of the rounds", S2Q_VOTE: "s2q-weighted vote", STOP_VOTE: "vote up to the stop"}
    label = names.get(name, name.replace("round_", "fixed round "))
    return label + (" *" if entry["reads_labels"] else "")


def format_rules(analysis: dict, title: str) -> str:
    """One block of the table: a row per rule, in percent, the difference with the zero round and
    its 95 % paired interval, and the share of episodes whose foreground IoU rose / fell."""
    head = (f"{'rule':<28} | {'mIoU':>6} {'FB-IoU':>6} | {'dmIoU':>6} {'95% interval':>16} | "
            f"{'dFB':>6} {'95% interval':>16} | {'better':>6} {'worse':>6}")
    lines = [title, head, "-" * len(head)]
    for name, entry in analysis["rules"].items():
        text = f"{rule_label(name, entry):<28} | {100 * entry['miou']:6.2f} {100 * entry['fbiou']:6.2f} |"
        if "vs_zero" in entry:
            v = entry["vs_zero"]
            text += (f" {100 * v['miou']['point']:+6.2f} [{100 * v['miou']['low']:+6.2f},{100 * v['miou']['high']:+6.2f}] |"
                     f" {100 * v['fbiou']['point']:+6.2f} [{100 * v['fbiou']['low']:+6.2f},{100 * v['fbiou']['high']:+6.2f}] |"
                     f" {v['improved']:6.0%} {v['worsened']:6.0%}")
        lines.append(text)
    return "\n".join(lines)


def format_analysis(per_seed: Mapping[int, dict], pooled: Optional[dict], draws: int, seed: int) -> str:
    """Per-seed blocks, then the pooled block (when there is more than one seed), and the legend."""
    blocks = [format_rules(a, f"seed {s}: {a['episodes']} episodes") for s, a in per_seed.items()]
    if pooled is not None and len(per_seed) > 1:
        blocks.append(format_rules(pooled, f"all {pooled['seeds']} seeds pooled: {pooled['episodes']} episodes"))
    blocks.append(f"* reads the query's labels to choose the round (not a label-free result). Intervals: paired "
                  f"bootstrap over episodes against the zero round, {draws} draws, seed {seed}; better/worse: "
                  "share of episodes whose foreground IoU rose/fell.")
    return "\n\n".join(blocks)


def tensorboard_scalars(analysis: dict, prefix: str) -> dict[str, float]:
    """Scalars of one analysis, by TensorBoard tag."""
    out = {}
    for name, entry in analysis["rules"].items():
        out[f"{prefix}/{name}/miou"] = entry["miou"]
        out[f"{prefix}/{name}/fbiou"] = entry["fbiou"]
        if "vs_zero" in entry:
            for metric in ("miou", "fbiou"):
                for key in ("point", "low", "high"):
                    out[f"{prefix}/{name}/d{metric}_{key}"] = entry["vs_zero"][metric][key]
            out[f"{prefix}/{name}/improved"] = entry["vs_zero"]["improved"]
            out[f"{prefix}/{name}/worsened"] = entry["vs_zero"]["worsened"]
    return out


def write_plots(out: Path, per_seed: Mapping[int, dict], pooled: dict) -> dict[str, np.ndarray]:
    """The five PNGs of a run (all seeds together) in ``out``; returns them by name for TensorBoard."""
    from evaluation import plots  # matplotlib only where plots are drawn, not for every importer of the records

    analyses = list(per_seed.values())
    episodes = [e for a in analyses for e in a["_"]["episodes"]]
    with_gt, label_free = pooled["with_gt_scores"], pooled["with_label_free_scores"]
    engine_rule = S2Q if label_free else S2Q_GT  # the rule the run's own EFTNet numbers used
    rules = pooled["rules"]
    images: dict[str, np.ndarray] = {}

    def draw(name: str, make: Callable[[Path], np.ndarray]) -> None:
        images[name] = make(out / f"plot_{name}.png")

    marks = {rule_label(n, rules[n]): 100 * rules[n]["miou"] for n in PLOTTED_RULES if n in rules}
    draw("round_miou", lambda p: plots.round_iou(p, [100 * v for v in pooled["round_miou"]], marks))
    draw("round_s2q_scores", lambda p: plots.round_scores(
        p, per_round_mean([e.scores for e in episodes]) if label_free else None,
        per_round_mean([e.gt_scores for e in episodes]) if with_gt else None))
    draw("chosen_rounds", lambda p: plots.chosen_rounds(
        p, {rule_label(n, rules[n]): rules[n]["chosen_rounds"] for n in PLOTTED_RULES if n in rules}))
    zero = np.concatenate([a["_"]["counts"][ZERO].fg_iou() for a in analyses])
    chosen = np.concatenate([a["_"]["counts"][engine_rule].fg_iou() for a in analyses])
    draw("gains", lambda p: plots.gain_histogram(
        p, 100 * (chosen - zero), f"{rule_label(engine_rule, rules[engine_rule])} - zero round, IoU points"))
    round_iou = [c[0, 1] / (c[1, 1] + EPS) for e in episodes for c in e.rounds]
    gt = [s for e in episodes for s in e.gt_scores] if with_gt else None
    if label_free:
        draw("s2q_score_vs_iou", lambda p: plots.score_vs_iou(p, [s for e in episodes for s in e.scores], round_iou, gt))
    else:
        draw("s2q_score_vs_iou", lambda p: plots.score_vs_iou(p, gt, round_iou, label="query ground truth"))
    return images


# ---- the fold summary (meta_test.sh / evaluation.report) --------------------------------------------
def save_rule_counts(path: Path, per_seed: Mapping[int, dict], num_classes: int) -> None:
    """Each rule's per-episode bg/fg counts of every seed, compact, so the fold summary can
    resample episodes without the records: {"num_classes", "seeds": {seed: {"class_idx",
    "rules": {rule: [[inter_bg, inter_fg, union_bg, union_fg], ...]}}}}."""
    data = {"num_classes": num_classes, "seeds": {
        str(s): {"class_idx": a["_"]["class_idx"].tolist(),
                 "rules": {n: np.concatenate([c.inter, c.union], 1).tolist() for n, c in a["_"]["counts"].items()}}
        for s, a in per_seed.items()}}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, separators=(",", ":")))
    tmp.replace(path)


def load_rule_counts(path: Path) -> dict[str, EpisodeCounts]:
    """A fold's counts by rule, its seeds concatenated."""
    data = json.loads(Path(path).read_text())
    n = int(data["num_classes"])
    seeds = list(data["seeds"].values())
    names = [name for name in seeds[0]["rules"] if all(name in s["rules"] for s in seeds)]
    out = {}
    for name in names:
        parts = []
        for s in seeds:
            array = np.asarray(s["rules"][name], dtype=np.int64).reshape(-1, 4)
            parts.append(EpisodeCounts(np.asarray(s["class_idx"]), array[:, :2], array[:, 2:], n))
        out[name] = concat(parts)
    return out


def folds_comparison(folds: Sequence[Mapping[str, EpisodeCounts]], rule: str, draws: int = DEFAULT_DRAWS,
                     seed: int = DEFAULT_SEED, against: str = ZERO) -> Optional[dict]:
    """``rule`` against the rule ``against`` (the zero round by default), the mean over folds of
    each fold's difference with its paired interval (each fold resampled on its own); None when
    a fold lacks either rule."""
    if not folds or any(rule not in f or against not in f for f in folds):
        return None
    return pooled_over_folds([(f[rule], f[against]) for f in folds], draws, seed).to_dict()
