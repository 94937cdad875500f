"""Table of several folds' results (the ``results.json`` files meta_test.py writes) and their mean.

    python -m util.report exp/demo/.../split0/results.json exp/demo/.../split1/results.json ...
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from util.errors import DataError, user_errors

REQUIRED = ("split", "zero")  # keys every results.json of meta_test.py holds


def fold_table(results: list[dict]) -> str:
    """Per fold: mean over seeds of class mIoU and FB-IoU, base model vs EFTNet; then the mean."""
    with_eftnet = all("eftnet" in r for r in results)
    head = f"{'fold':>4} | {'mIoU base':>9} {'FB-IoU base':>11}"
    if with_eftnet:
        head += f" | {'mIoU EFTNet':>11} {'FB-IoU EFTNet':>13} | {'dmIoU':>6} {'dFB-IoU':>7}"
    rows, sums = [head, "-" * len(head)], None
    for r in results:
        values = [100 * r["zero"]["miou_mean"], 100 * r["zero"]["fbiou_mean"]]
        if with_eftnet:
            values += [100 * r["eftnet"]["miou_mean"], 100 * r["eftnet"]["fbiou_mean"]]
        sums = values if sums is None else [a + b for a, b in zip(sums, values)]
        rows.append(_row(str(r["split"]), values, with_eftnet))
    rows.append("-" * len(head))
    rows.append(_row("mean", [v / len(results) for v in sums], with_eftnet))
    notes = {f"EFTNet s2q query mask: {r['s2q_query_mask']}" for r in results if with_eftnet}
    if any(r.get("uses_query_labels") for r in results):
        notes.add("round selection read the query ground-truth labels (reference behaviour)")
    # A fold's warnings travel with its numbers: the summary is never read without them.
    warnings = [f"WARNING (fold {r['split']}): {w}" for r in results for w in r.get("warnings", [])]
    return "\n".join(rows + sorted(notes) + list(dict.fromkeys(warnings)))


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


def _row(name: str, v: list[float], with_eftnet: bool) -> str:
    text = f"{name:>4} | {v[0]:9.2f} {v[1]:11.2f}"
    if with_eftnet:
        text += f" | {v[2]:11.2f} {v[3]:13.2f} | {v[2] - v[0]:+6.2f} {v[3] - v[1]:+7.2f}"
    return text


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="results.json files, one per fold")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an input error")
    args = parser.parse_args(argv)
    with user_errors("util/report.py", args.debug):
        table = fold_table([read_results(p) for p in args.results])
    print(table)
    return table


if __name__ == "__main__":
    main()
