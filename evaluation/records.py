"""Evaluation protocol: seeds, per-episode records, metrics rebuilt from records, tables.

Every finished episode becomes one JSON record holding its pixel counts, so that a killed
run resumes from its records and ends with exactly the numbers of an uninterrupted run,
and ranks under torchrun can sum what each of them evaluated.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np
import torch

from evaluation.metrics import BaseClassMeter, FewShotMeter, episode_counts
from evaluation.tables import method_values, side_by_side
from util.errors import DataError

FIXED_SEED = 321  # EFTNet appends this seed to the drawn ones
DRAWN_SEEDS = 5


def evaluation_seeds(manual_seed: int, count: int) -> list[int]:
    """The reference's seeds: 5 draws of numpy's legacy RNG seeded with ``manual_seed``, then 321
    (PASCAL 123 -> 510 365 382 322 988 321). More than 6 draws more before the fixed seed."""
    rng = np.random.RandomState(manual_seed)
    drawn = [int(s) for s in rng.randint(0, 1000, max(DRAWN_SEEDS, count - 1))]
    seeds = drawn[:DRAWN_SEEDS] + [FIXED_SEED] + drawn[DRAWN_SEEDS:]
    return seeds[:count]


def per_round_mean(values: Sequence[Sequence[float]]) -> list[float]:
    """Mean of round r over the episodes that reached round r. Episodes that stopped early
    have shorter lists, so the lists are ragged and ``np.mean(values, 0)`` would fail."""
    length = max((len(v) for v in values), default=0)
    return [float(np.mean([v[r] for v in values if len(v) > r])) for r in range(length)]


def _counts(logits: torch.Tensor, label: torch.Tensor, classes: int) -> list[list[int]]:
    return [c.tolist() for c in episode_counts(logits, label, classes)]


def round_fields(rounds: Sequence, label_orig: torch.Tensor, gt_scores: Optional[Sequence[float]],
                 label_free: bool = True, votes: Optional[Mapping[str, torch.Tensor]] = None) -> dict:
    """What an episode record's ``rounds`` holds beside the engine's scores: each round's
    final-prediction counts against the original-resolution label (every selection rule is
    measured on them), and the ground-truth s2q scores when recorded. ``label_free``: whether
    the record's own ``scores`` used the pseudo label (False in a ``s2q_query_mask:
    ground_truth`` run, whose engine scores are then also its ``gt_scores``). ``votes``: the
    engine's vote-rule predictions, recorded as counts like a round's."""
    fields = {"counts": [_counts(r.final, label_orig, 2) for r in rounds], "label_free": label_free}
    if votes:
        fields["votes"] = {name: _counts(final, label_orig, 2) for name, final in votes.items()}
    if gt_scores is not None:
        fields["gt_scores"] = [float(s) for s in gt_scores]
    return fields


def episode_record(index: int, batch: dict, zero, eft, num_base_classes: int,
                   gt_scores: Optional[list[float]] = None, label_free: bool = True) -> dict:
    """Counts of one episode for the base model (``zero``) and, if run, EFTNet (``eft``): also
    every round's counts (so that every selection rule can be measured on the same episodes) and
    the ground-truth s2q scores ``gt_scores`` when recorded; ``label_free`` says whether the
    engine's own scores used the pseudo label."""
    label = batch["query_mask_orig"][0]
    record = {"episode": index, "class_idx": int(batch["class_idx"]),
              "zero": {"final": _counts(zero.final, label, 2), "meta": _counts(zero.meta, label, 2)}}
    if zero.base is not None:  # a model with a base learner
        record["base"] = _counts(zero.base, batch["query_base_orig"][0], num_base_classes + 1)
    if eft is not None:
        record["eftnet"] = {"final": _counts(eft.final, label, 2), "meta": _counts(eft.meta, label, 2)}
        record["rounds"] = {"scores": eft.round_scores, "chosen": eft.chosen_round, "losses": eft.losses,
                            "stopped_early": eft.stopped_early,
                            **round_fields(eft.rounds, label, gt_scores, label_free, eft.votes)}
    return record


def record_counts(counts: list[list[int]]) -> list[torch.Tensor]:
    """A record's (intersection, union, target) lists as float64 tensors for the meters."""
    return [torch.tensor(c, dtype=torch.float64) for c in counts]


def _counts_problem(value: object, name: str) -> Optional[str]:
    """What is wrong with an (intersection, union, target) triple of a record, if anything."""
    if not (isinstance(value, list) and len(value) == 3 and all(isinstance(c, list) for c in value)
            and len({len(c) for c in value}) == 1
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for c in value for v in c)):
        return f"'{name}' is not three lists of pixel counts"
    return None


def record_problem(record: object, episodes: int, with_base: bool = True) -> Optional[str]:
    """What makes ``record`` something other than an episode record of a run of ``episodes``
    episodes (as ``episode_record`` writes them; ``with_base``: of a model with a base learner), or None."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an episode record"
    missing = [k for k in ("episode", "class_idx", "zero", *(("base",) if with_base else ())) if k not in record]
    if missing:
        return f"no {', '.join(repr(k) for k in missing)} field"
    index = record["episode"]
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < episodes:
        return f"episode {index!r} is not an episode index of this run (0..{episodes - 1})"
    if not isinstance(record["class_idx"], int):
        return f"class_idx {record['class_idx']!r} is not an integer"
    for method in ("zero", "eftnet"):
        if method in record:
            if not isinstance(record[method], dict):
                return f"'{method}' is not a mapping of outputs"
            for output in ("final", "meta"):
                problem = _counts_problem(record[method].get(output), f"{method}.{output}")
                if problem:
                    return problem
    if "eftnet" in record:
        rounds = record.get("rounds")
        needed = ("scores", "chosen", "losses", "stopped_early")
        if not isinstance(rounds, dict) or any(k not in rounds for k in needed):
            return "'rounds' lacks the scores, chosen round, losses or stop flag of the EFTNet rounds"
    return _counts_problem(record["base"], "base") if with_base else None


class RecordFile:
    """Append-only JSON-lines file of episode records, flushed after each one.

    A kill can cut the last line short; nothing else may be wrong in the file. ``read_all``
    refuses a damaged or repeated record (DataError naming file and line) and reports a cut
    last line, which ``repair`` removes so that its episode runs again."""

    def __init__(self, path: Path):
        self.path = path

    def append(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    @staticmethod
    def lines(path: Path) -> tuple[list[bytes], bytes]:
        """The file's complete lines and the unterminated rest that a kill left (b"" if none)."""
        data = path.read_bytes()
        *lines, tail = data.split(b"\n")
        return lines, tail

    @staticmethod
    def parse(raw: bytes, episodes: int, with_base: bool = True) -> tuple[Optional[dict], Optional[str]]:
        """One line as (record, None), or (None, what is wrong with it)."""
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            return None, "bytes that are not UTF-8 text"
        except json.JSONDecodeError as err:
            return None, f"not JSON ({err.msg})"
        problem = record_problem(record, episodes, with_base)
        return (None, problem) if problem else (record, None)

    @staticmethod
    def read_all(paths: Iterable[Path], episodes: int, with_base: bool = True) -> tuple[dict[int, dict], list[str]]:
        """Records by episode index, and a note for every cut last line (left out: its episode
        runs again). Raises DataError on a line that is not an episode record of a run of
        ``episodes`` episodes (``with_base``: with the base learner's counts), or an episode
        recorded twice."""
        records, seen, notes = {}, {}, []
        for path in paths:
            lines, tail = RecordFile.lines(path)
            for number, raw in enumerate(lines + ([tail] if tail else []), start=1):
                record, problem = RecordFile.parse(raw, episodes, with_base)
                if problem and number > len(lines):
                    notes.append(f"{path}, line {number}: the last record was cut short by a kill; it is removed "
                                 "and its episode runs again")
                    continue
                if problem:
                    raise DataError(f"{path}, line {number}: {problem}. The records file is damaged: delete it (its "
                                    "episodes run again) or pass --restart to start the run afresh")
                index = record["episode"]
                if index in records:
                    raise DataError(f"{path}, line {number}: episode {index} is recorded a second time (first at "
                                    f"{seen[index]}): two runs wrote into this folder at once; pass --restart to "
                                    "start the run afresh")
                records[index], seen[index] = record, f"{path.name}, line {number}"
        return records, notes

    @staticmethod
    def repair(path: Path, episodes: int, with_base: bool = True) -> None:
        """End the file with its last whole record: a cut last line goes (``read_all`` has
        reported it), a whole record that lost only its newline gets it back."""
        _, tail = RecordFile.lines(path)
        if not tail:
            return
        if RecordFile.parse(tail, episodes, with_base)[0] is not None:
            with open(path, "ab") as f:
                f.write(b"\n")
        else:
            with open(path, "rb+") as f:
                f.truncate(path.stat().st_size - len(tail))


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
        self.base = BaseClassMeter(num_base) if num_base else None  # 0: the model has no base learner
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
        if self.base is not None:
            self.base.add(*record_counts(record["base"]))
        if "rounds" in record:
            if record["rounds"]["chosen"] is not None:  # None: a vote rule answered
                self.chosen.append(record["rounds"]["chosen"])
            self.round_scores.append(record["rounds"]["scores"])
            self.round_losses.append(record["rounds"]["losses"])
            self.stopped_early += int(record["rounds"]["stopped_early"])

    def all_reduce(self) -> None:
        for meter in (*self.meters.values(), *([self.base] if self.base is not None else [])):
            meter.all_reduce()

    def summary(self, with_eftnet: bool) -> dict:
        out = {"episodes": self.episodes, "base_miou": None if self.base is None else self.base.miou()}
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
    and the base learner's base-class mIoU (a model without one: no such column)."""
    with_base = all(s["base_miou"] is not None for s in per_seed.values())
    rows = [(str(seed), method_values(s, with_eftnet) + ([100 * s["base_miou"]] if with_base else []))
            for seed, s in per_seed.items()]
    return side_by_side("seed", rows, with_eftnet, extra="base-cls mIoU" if with_base else None,
                        totals=("mean", "best"))
