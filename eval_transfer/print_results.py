"""Print the transfer results of several data sets as one markdown table.

    python eval_transfer/print_results.py F1 [F2 ...]    # features folders or results.json files

Each row: data set, classifier, feature normalisation, test top-1 and mean per-class accuracy (percent), the
chosen hyper-parameters; the last row is the unweighted mean over the data sets found.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def load_result(path: str) -> dict | None:
    file = os.path.join(path, "results.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        return None
    with open(file) as f:
        result = json.load(f)
    result.setdefault("dataset", os.path.basename(os.path.dirname(os.path.abspath(file))))
    return result


def format_table(results: list[dict]) -> str:
    rows = ["| data set | classifier | norm | top-1 | mean per-class | hyper-parameters |",
            "|---|---|---|---:|---:|---|"]
    for r in results:
        params = ", ".join(f"{k}={v:.3g}" for k, v in sorted(r.get("best_params", {}).items()))
        rows.append(f"| {r['dataset']} | {r.get('clf_type', '?')} | {r.get('features_norm', '?')} | "
                    f"{100 * r['top1']:.2f} | {100 * r['mean_per_class_acc']:.2f} | {params} |")
    if len(results) > 1:
        top1 = sum(r["top1"] for r in results) / len(results)
        per_class = sum(r["mean_per_class_acc"] for r in results) / len(results)
        rows.append(f"| **mean ({len(results)})** | | | {100 * top1:.2f} | {100 * per_class:.2f} | |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="features folders (holding results.json) or results files")
    args = parser.parse_args(argv)
    results, missing = [], []
    for path in args.paths:
        result = load_result(path)
        (results if result is not None else missing).append(result if result is not None else path)
    if missing:
        print(f"no results for: {', '.join(missing)}", file=sys.stderr)
    if not results:
        print("error: no results.json found", file=sys.stderr)
        return 2
    print(format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
