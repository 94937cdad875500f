"""Table of several folds' results (the ``results.json`` files meta_test.py writes) and their mean.

    python -m evaluation.report exp/demo/.../split0/results.json exp/demo/.../split1/results.json ...
    python -m evaluation.report --ablation exp/demo/MSANet_mobilenetv2_1shot   (the runs of ablation.sh)
    python -m evaluation.report --miniature exp/miniature/default/demo       (the runs of miniature.sh)
    python -m evaluation.report --rules exp/miniature/default/demo           (their label-free rules vs s2q)
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

from evaluation.analysis import COUNTS_FILE, folds_comparison, load_rule_counts, rule_label
from evaluation.selection import S2Q, S2Q_GT, ZERO
from evaluation.bootstrap import DEFAULT_DRAWS, DEFAULT_SEED
from evaluation.published import comparison_table
from evaluation.tables import method_values, side_by_side
from util.errors import DataError, user_errors

REQUIRED = ("split", "zero")  # keys every results.json of meta_test.py holds
# What a results.json says of its setting; a summary's folds must agree on each.
SETTING = ("data_set", "arch", "backbone", "shot", "loop_ft", "s2q_query_mask")
# Config keys that differ between the folds of one setting (the fold, its files) or that do not
# change the numbers (outputs, loader processes, device); every other key must agree.
PER_FOLD_KEYS = frozenset({"split", "val_list", "train_list", "episode_file", "show", "show_ft", "exp_root",
                           "tb_images", "workers", "device"})
WEIGHT_KEYS = ("weight", "base_weight")  # every arch's checkpoint and base file names: one per fold


def bootstrap_of(results: dict) -> tuple[int, int]:
    """The draws and seed of a run's paired bootstrap, which the fold summary repeats."""
    settings = results.get("bootstrap", {})
    return settings.get("draws", DEFAULT_DRAWS), settings.get("seed", DEFAULT_SEED)


def engine_rule(results: dict) -> str:
    """The rules-table row that is a run's own EFTNet answer: its round_selection, or the
    reference's s2q with the query label in a ground_truth run."""
    if results.get("uses_query_labels"):
        return S2Q_GT
    return results.get("settings", {}).get("round_selection", S2Q)


def fold_table(results: list[dict]) -> str:
    """Per fold: mean over seeds of class mIoU and FB-IoU, base model vs EFTNet; then the mean."""
    with_eftnet = all("eftnet" in r for r in results)
    rows = [(str(r["split"]), method_values(r, with_eftnet, "_mean")) for r in results]
    table = side_by_side("fold", rows, with_eftnet)
    notes = {f"EFTNet s2q query mask: {r['s2q_query_mask']}" for r in results if with_eftnet}
    if any(r.get("uses_query_labels") for r in results):
        notes.add("round selection read the query ground-truth labels (reference behaviour)")
    # A fold's warnings travel with its numbers: the summary is never read without them.
    warnings = [f"WARNING (fold {r['split']}): {w}" for r in results for w in r.get("warnings", [])]
    return "\n".join([table] + sorted(notes) + list(dict.fromkeys(warnings)))


def rules_table(results: list[dict], counts: list[Optional[dict]]) -> Optional[str]:
    """Every selection rule against the zero round over the folds: each fold's difference
    (its seeds pooled) and the mean over folds with its paired interval (each fold resampled on
    its own). ``counts[i]``: fold i's per-rule counts (episode_counts.json), None if missing."""
    if not all("rules" in r for r in results):
        return None
    pooled = [r["rules"]["pooled"]["rules"] for r in results]
    names = [n for n in pooled[0] if n != "zero" and all(n in p for p in pooled)]
    draws, seed = bootstrap_of(results[0])
    head = _rules_head("rule: dmIoU vs zero round", results)
    lines = [head, "-" * len(head)]
    for name in names:
        lines.append(_rule_row(rule_label(name, pooled[0][name]), name, pooled, counts, draws, seed))
    against_s2q = [n for n in names if all("vs_s2q" in p[n] for p in pooled)]
    if against_s2q:  # the comparison that decides whether a rule beats the paper's
        head = _rules_head("rule: dmIoU vs EFTNet s2q", results)
        lines += ["", head, "-" * len(head)]
        lines += [_rule_row(rule_label(n, pooled[0][n]), n, pooled, counts, draws, seed, S2Q) for n in against_s2q]
    lines.append(f"* reads the query's labels. Per fold: all seeds pooled. Mean over folds: paired bootstrap, "
                 f"each fold resampled on its own, {draws} draws, seed {seed}"
                 + ("" if all(c is not None for c in counts) else f"; no interval: a fold lacks its {COUNTS_FILE}")
                 + ".")
    return "\n".join(lines)


def _rules_head(title: str, results: list[dict]) -> str:
    return (f"{title:<28} | " + " ".join(f"{'fold ' + str(r['split']):>7}" for r in results)
            + f" | {'mean':>7} {'95% interval':>16} | {'dFB mean':>8} {'95% interval':>16}")


def _rule_row(label: str, name: str, pooled: list[dict], counts: list[Optional[dict]], draws: int, seed: int,
              against: str = ZERO) -> str:
    """One rule against the rule ``against`` (the zero round by default): each fold's difference,
    the mean over folds and its paired interval (none when a fold lacks its per-rule counts)."""
    versus = f"vs_{against}"
    cells = " ".join(f"{100 * p[name][versus]['miou']['point']:+7.2f}" for p in pooled)
    line = f"{label:<28} | {cells} |"
    both = folds_comparison(counts, name, draws, seed, against) if all(c is not None for c in counts) else None
    if both is None:
        mean = sum(p[name][versus]["miou"]["point"] for p in pooled) / len(pooled)
        return line + f" {100 * mean:+7.2f} {'-':>16} | {'-':>8} {'-':>16}"
    m, f = both["miou"], both["fbiou"]
    return line + (f" {100 * m['point']:+7.2f} [{100 * m['low']:+6.2f},{100 * m['high']:+6.2f}] |"
                   f" {100 * f['point']:+8.2f} [{100 * f['low']:+6.2f},{100 * f['high']:+6.2f}]")


def ablation_table(variants: dict[str, list[str | Path]]) -> str:
    """EFTNet (its s2q selection) against the base model for each variant's folds, one row a
    variant, plus "no discrimination" (the reference variant's last round, same run)."""
    rows, head = [], None
    for variant, paths in variants.items():
        results = read_runs(paths)
        counts = [read_counts(p) for p in paths]
        if not all("rules" in r for r in results):
            raise DataError(f"ablation variant {variant}: its results.json files lack the selection rules "
                            "(written by an older meta_test.py): rerun it")
        pooled = [r["rules"]["pooled"]["rules"] for r in results]
        rule = engine_rule(results[0])
        draws, seed = bootstrap_of(results[0])
        head = head or _rules_head("variant: dmIoU vs base model", results)
        rows.append(_rule_row(variant, rule, pooled, counts, draws, seed))
        if variant == "reference":
            rows.append(_rule_row("no discrimination (last)", "last", pooled, counts, draws, seed))
    return "\n".join([head, "-" * len(head), *rows,
                      "Each row: EFTNet's round selection against the zero round of the same run; the mean over "
                      "folds with a paired bootstrap interval (each fold resampled on its own)."])


def ablation_runs(root: str | Path) -> dict[str, list[Path]]:
    """The variants that ablation.sh ran under ``root``: {variant: [results.json per fold]}."""
    folders = sorted(Path(root).glob("ablation_*"))
    if not folders:
        raise FileNotFoundError(f"no ablation_* folders under {root} (run ablation.sh first)")
    runs = {f.name[len("ablation_"):]: sorted(f.glob("split*/results.json")) for f in folders}
    return dict(sorted(runs.items(), key=lambda item: (item[0] != "reference", item[0])))  # reference first


def published_table(results: list[dict], counts: list[Optional[dict]]) -> Optional[str]:
    """Ours beside the papers' numbers (base model and EFTNet), for PASCAL and COCO runs of one
    setting; the folds agree on ``s2q_query_mask`` (``read_runs``), which the EFTNet paper row is
    compared under."""
    settings = {(r["data_set"], r["arch"], r["backbone"], r["shot"]) for r in results}
    if len(settings) != 1 or next(iter(settings))[0] not in ("pascal", "coco"):
        return None
    data_set, arch, backbone, shot = next(iter(settings))
    ours = {r["split"]: {m: r[m]["miou_mean"] for m in ("zero", "eftnet") if m in r} for r in results}
    fold_intervals, mean_interval = {}, None
    rule = engine_rule(results[0])
    for r in results:
        entry = r.get("rules", {}).get("pooled", {}).get("rules", {}).get(rule)
        if entry:
            fold_intervals[r["split"]] = (entry["vs_zero"]["miou"]["low"], entry["vs_zero"]["miou"]["high"])
    if sorted(ours) == [0, 1, 2, 3] and all(c is not None for c in counts):
        both = folds_comparison(counts, rule, *bootstrap_of(results[0]))
        if both is not None:
            mean_interval = (both["miou"]["low"], both["miou"]["high"])
    return comparison_table(data_set, arch, backbone, shot, ours, fold_intervals, mean_interval,
                            results[0].get("s2q_query_mask"))


def miniature_runs(root: str | Path) -> dict[tuple[str, str, int], list[Path]]:
    """The settings under ``root`` (miniature.sh's runs): {(arch, backbone, shot): [results.json
    per fold]}, read from the files themselves."""
    runs: dict[tuple[str, str, int], list[Path]] = {}
    seen: dict[tuple, Path] = {}
    for path in sorted(Path(root).glob("*/*/split*/results.json")):
        r = read_results(path)
        setting = (r.get("arch", "MSANet"), r.get("backbone", "?"), int(r.get("shot", 1)))
        if (*setting, r["split"]) in seen:
            raise DataError(f"{path} and {seen[(*setting, r['split'])]} are two runs of the same setting and fold: "
                            "give a root that holds one run per setting (miniature.sh's EXP)")
        seen[(*setting, r["split"])] = path
        runs.setdefault(setting, []).append(path)
    if not runs:
        raise FileNotFoundError(f"no */*/split*/results.json under {root} (run miniature.sh first)")
    return runs


def _setting_cells(paths: list[Path]) -> tuple[str, str]:
    """A setting's base-model cell and EFTNet cell: class mIoU mean over folds, EFTNet's gain in
    parentheses with its paired interval over folds."""
    results, counts = read_runs(paths), [read_counts(p) for p in paths]
    zero = sum(100 * r["zero"]["miou_mean"] for r in results) / len(results)
    if not all("eftnet" in r for r in results):
        return f"{zero:.2f}", "-"
    eft = sum(100 * r["eftnet"]["miou_mean"] for r in results) / len(results)
    rule = engine_rule(results[0])
    both = folds_comparison(counts, rule, *bootstrap_of(results[0])) if all(c is not None for c in counts) else None
    interval = f" [{100 * both['miou']['low']:+.2f},{100 * both['miou']['high']:+.2f}]" if both else ""
    return f"{zero:.2f}", f"{eft:.2f} ({eft - zero:+.2f}){interval}"


def miniature_table(runs: dict[tuple[str, str, int], list[Path]]) -> str:
    """The paper's table in miniature: per base model and backbone, a base-model row and an
    EFTNet row; columns 1-shot and 5-shot (class mIoU in %, mean over folds)."""
    shots = sorted({shot for _, _, shot in runs})
    width = 34
    head = (f"{'class mIoU (%), mean over folds':<32} | " + " | ".join(f"{f'{s}-shot':<{width}}" for s in shots)).rstrip()
    lines = [head, "-" * len(head)]
    for arch, backbone in sorted({(a, b) for a, b, _ in runs}, key=lambda k: (k[0] != "MSANet", k)):
        cells = {s: _setting_cells(runs[(arch, backbone, s)]) if (arch, backbone, s) in runs else ("-", "-")
                 for s in shots}
        folds = sorted({len(runs[k]) for k in runs if k[:2] == (arch, backbone)})
        for row, label in ((0, f"{arch} ({backbone})"), (1, "  + EFTNet")):
            line = f"{label:<32} | " + " | ".join(f"{cells[s][row]:<{width}}" for s in shots)
            lines.append((line + (f" ({'/'.join(map(str, folds))} folds)" if row == 0 else "")).rstrip())
    lines.append("EFTNet: label-free round selection unless marked; (gain over the base model) [95% paired "
                 "bootstrap interval of the mean over folds, each fold resampled on its own].")
    return "\n".join(lines)


def _interval_cell(both: Optional[dict]) -> str:
    if both is None:
        return "-"
    m = both["miou"]
    return f"{100 * m['point']:+.2f} [{100 * m['low']:+.2f},{100 * m['high']:+.2f}]"


def rules_overview(runs: dict[tuple[str, str, int], list[Path]]) -> str:
    """Every label-free rule of miniature.sh's settings in one table: the paper's s2q against the
    base model, then each other rule against s2q (the comparison that decides whether it beats
    the paper's rule), as the mean over folds with its paired interval."""
    settings = sorted(runs, key=lambda k: (k[0] != "MSANet", k))
    folds = {k: [read_counts(p) for p in runs[k]] for k in settings}
    results = {k: read_runs(runs[k]) for k in settings}
    for k in settings:
        if not all("rules" in r for r in results[k]):
            raise DataError(f"{runs[k][0].parent.parent}: runs without EFTNet's rules (loop_ft False): "
                            "no rule to compare")
    pooled = {k: [r["rules"]["pooled"]["rules"] for r in results[k]] for k in settings}
    draws, seed = bootstrap_of(results[settings[0]][0])
    names = [n for n in pooled[settings[0]][0] if not pooled[settings[0]][0][n]["reads_labels"] and n != ZERO]
    width = 22
    head = f"{'class mIoU, mean over folds':<30} | " + " | ".join(f"{f'{a} {s}-shot':<{width}}" for a, _, s in settings)
    lines = [head, "-" * len(head)]

    def row(label: str, name: str, against: str) -> str:
        cells = [_interval_cell(folds_comparison(folds[k], name, draws, seed, against))
                 if all(c is not None for c in folds[k]) else "-" for k in settings]
        return f"{label:<30} | " + " | ".join(f"{c:<{width}}" for c in cells)

    lines.append(row("s2q - base model", S2Q, ZERO))
    lines += [row(f"{rule_label(n, pooled[settings[0]][0][n])} - s2q", n, S2Q) for n in names if n != S2Q]
    lines.append(f"Label-free rules only; [95% paired bootstrap interval of the mean over folds, each fold "
                 f"resampled on its own, {draws} draws, seed {seed}].")
    return "\n".join(line.rstrip() for line in lines)


def read_counts(results_path: str | Path) -> Optional[dict]:
    """The per-rule counts meta_test.py wrote beside a results.json; None if absent."""
    path = Path(results_path).with_name(COUNTS_FILE)
    if not path.is_file():
        return None
    try:
        return load_rule_counts(path)
    except (json.JSONDecodeError, KeyError, ValueError, TypeError):
        raise DataError(f"{path} is not an {COUNTS_FILE} written by meta_test.py") from None


def summary(paths: list[str | Path]) -> str:
    """The fold table, the selection rules over folds and, for PASCAL/COCO, the papers' numbers."""
    results = read_runs(paths)
    counts = [read_counts(p) for p in paths]
    parts = [fold_table(results)]
    for extra in (rules_table(results, counts), published_table(results, counts)):
        if extra:
            parts.append(extra)
    return "\n\n".join(parts)


def _differences(a: dict, b: dict) -> list[str]:
    """How the settings of two runs differ, in words (empty when they are folds of one setting)."""
    keys = [(k, a.get(k), b.get(k)) for k in SETTING]
    if "settings" in a and "settings" in b:
        shared = [k for k in sorted(set(a["settings"]) | set(b["settings"]))
                  if k not in PER_FOLD_KEYS and not k.startswith(WEIGHT_KEYS) and k not in SETTING]
        keys += [(k, a["settings"].get(k), b["settings"].get(k)) for k in shared]
    return [f"{key} {x!r} vs {y!r}" for key, x, y in keys if x != y]


def read_runs(paths: list[str | Path]) -> list[dict]:
    """The results.json of each fold of one setting (DataError naming two runs that are the same
    fold, or of settings that differ, and what differs): averaging them would mix settings."""
    results = [read_results(p) for p in paths]
    for i, (path, r) in enumerate(zip(paths, results)):
        for other_path, other in zip(paths[:i], results[:i]):
            differ = _differences(other, r)
            if differ:
                shown = "; ".join(differ[:5]) + ("; ..." if len(differ) > 5 else "")
                raise DataError(f"{other_path} and {path} are runs of different settings ({shown}): a summary "
                                "averages the folds of one setting; give one run per fold of one setting")
            if other["split"] == r["split"]:
                raise DataError(f"{other_path} and {path} are both fold {r['split']} of one setting: a summary "
                                "averages distinct folds; give one run per fold")
    return results


def read_results(path: str | Path) -> dict:
    """One fold's results.json, checked to be meta_test.py's (DataError naming the file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"results file not found: {path} (did meta_test.py finish for that fold?)")
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not valid JSON (line {err.lineno}: {err.msg})") from None
    except UnicodeDecodeError:
        raise DataError(f"{path} is not a text (JSON) file") from None
    if not isinstance(results, dict) or any(k not in results for k in REQUIRED):
        raise DataError(f"{path} is not a results.json written by meta_test.py")
    return results


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="*", help="results.json files, one per fold")
    parser.add_argument("--ablation", metavar="ROOT", help="the ablation table of ablation.sh's runs under ROOT")
    parser.add_argument("--miniature", metavar="ROOT", help="the paper-shaped table of miniature.sh's runs under ROOT")
    parser.add_argument("--rules", metavar="ROOT",
                        help="every label-free rule against s2q, miniature.sh's runs under ROOT")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an input error")
    args = parser.parse_args(argv)
    if sum(map(bool, (args.results, args.ablation, args.miniature, args.rules))) != 1:
        parser.error("give results.json files, --ablation ROOT, --miniature ROOT or --rules ROOT")
    with user_errors("evaluation/report.py", args.debug):
        if args.ablation:
            table = ablation_table(ablation_runs(args.ablation))
        elif args.miniature:
            table = miniature_table(miniature_runs(args.miniature))
        elif args.rules:
            table = rules_overview(miniature_runs(args.rules))
        else:
            table = summary(args.results)
    print(table)
    return table


if __name__ == "__main__":
    main()
