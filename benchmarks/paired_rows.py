"""Two DDRM rows of a quality run, compared crop by crop, and the second against the best tuned
classical method.

    python benchmarks/paired_rows.py benchmarks/results/final-step/tiny 20x4 20x4:weighted
    python benchmarks/paired_rows.py benchmarks/results/final-step/tiny-isotropic 20x4 20x4:weighted \\
        --baseline-from benchmarks/results/df5t-tiny-em
    python benchmarks/paired_rows.py benchmarks/results 20x4:weighted 3x4:weighted:matched --task denoise \\
        --baseline-from benchmarks/results/walk-frontier/full-walk-20x4

Rows are written as for ``quality.py --rows``. ``--baseline-from`` takes the first row from
another run's results (a partial run that added a row to a full one); its crops must be the
same, which the classical methods' scores, equal crop for crop, prove; ``--task`` keeps to some
tasks (a row the other tasks do not run). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import quality


def _cases(folder: Path) -> dict[tuple[str, str], dict]:
    path = folder / "quality.json"
    if not path.is_file():
        raise SystemExit(f"{path} not found: give the folder a quality run wrote (quality.py --out)")
    results = json.loads(path.read_text())
    return {(case["task"], case["dataset"]): case for case in results["cases"]}


def _psnr(case: dict, label: str) -> np.ndarray:
    if label not in case["scores"]:
        raise SystemExit(f"{case['task']} on {case['dataset']} has no row {label}; its rows: "
                         f"{', '.join(case['scores'])}")
    return np.array(case["scores"][label])[:, 0]


def _paired(diff: np.ndarray) -> str:
    return f"{diff.mean():+.2f} ± {diff.std(ddof=1):.2f} ({(diff > 0).sum()}/{len(diff)})"


def table(folder: Path, baseline_row: tuple, row: tuple, baseline_from: Path | None = None,
          tasks: list[str] | None = None) -> str:
    first, second = quality.ddrm_label(*baseline_row), quality.ddrm_label(*row)
    baselines = _cases(baseline_from or folder)
    lines = [f"| task | dataset | {first} (dB) | {second} (dB) | paired difference (crops better) "
             f"| best tuned classical (dB) | {second} - best (crops won) |", "|---|---|---:|---:|---|---|---|"]
    for key, case in _cases(folder).items():
        if tasks and case["task"] not in tasks:
            continue
        baseline = baselines[key]
        classical = [label for label in case["scores"] if not label.startswith("DDRM")]
        if any(baseline["scores"][label] != case["scores"][label] for label in classical):
            raise SystemExit(f"{key}: the baseline run's classical scores differ, so its crops are not these")
        best = quality.summary(case)["best_classical"]
        ours, theirs = _psnr(case, second), _psnr(baseline, first)
        lines.append(f"| {case['task']} | {case['dataset']} | {theirs.mean():.2f} | {ours.mean():.2f} "
                     f"| {_paired(ours - theirs)} | {best} {_psnr(case, best).mean():.2f} "
                     f"| {_paired(ours - _psnr(case, best))} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="a quality run's results folder")
    parser.add_argument("baseline_row", type=quality.ddrm_row)
    parser.add_argument("row", type=quality.ddrm_row)
    parser.add_argument("--baseline-from", type=Path, default=None,
                        help="results folder holding the baseline row (default: the same run)")
    parser.add_argument("--task", action="append", dest="tasks", help="only this task (repeatable)")
    args = parser.parse_args(argv)
    print(table(args.results, args.baseline_row, args.row, args.baseline_from, args.tasks))


if __name__ == "__main__":
    main()
