"""DDRM's eta chosen per task on the quality benchmark's validation crops (never its test crops).

    python benchmarks/eta_on_validation.py --model M.onnx --task denoise --eta 0.85 0.7 0.5 0.3

For each asked task and dataset, the ``VALIDATION_CROPS`` crops are restored with the quality
benchmark's DDRM row (``quality.default_rows``) at every eta,
seeds as the benchmark's; eta_b stays the published 1.0. Writes eta_on_validation.json and .md
(mean PSNR per eta, and its change over the published eta) to ``--out``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import quality

from df5t_deploy.settings import PUBLISHED_ETA


def validation_psnr(task: quality.Task, dataset: quality.Dataset, model: str, eta: float) -> list[float]:
    seed = quality.case_seed(task, dataset)
    crops = quality.pairs(task, dataset, "validation", quality.VALIDATION_CROPS, seed)
    return [quality.psnr_ssim(quality.ddrm_restore(task, measured, info, quality.default_rows(task)[0], model, seed + i,
                                                   eta=eta), truth)[0]
            for i, (truth, measured, info) in enumerate(crops)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=quality.REPO.parent / "shared" / "data" / "em")
    parser.add_argument("--model", required=True)
    parser.add_argument("--task", action="append", dest="tasks", required=True,
                        choices=[task.name for task in quality.tasks()])
    parser.add_argument("--eta", type=float, nargs="+", required=True)
    parser.add_argument("--out", type=Path, default=quality.RESULTS)
    args = parser.parse_args(argv)
    etas = sorted(set(args.eta) | {PUBLISHED_ETA}, reverse=True)
    cases = []
    for task in (t for t in quality.tasks() if t.name in args.tasks):
        for dataset in (d for d in quality.datasets(args.data) if d.name in task.datasets):
            psnr = {eta: validation_psnr(task, dataset, args.model, eta) for eta in etas}
            cases.append({"task": task.name, "dataset": dataset.name, "psnr": {str(k): v for k, v in psnr.items()}})
            print(f"{task.name}, {dataset.name}: " + ", ".join(f"eta {k}: {np.mean(v):.2f}" for k, v in psnr.items()),
                  flush=True)
    lines = [f"Command: `python benchmarks/eta_on_validation.py --model {args.model} "
             + " ".join(f"--task '{t}'" for t in args.tasks) + f" --eta {' '.join(map(str, args.eta))}`. "
             f"Mean PSNR (dB) on {quality.VALIDATION_CROPS} validation crops, each task's DDRM row of the quality "
             "benchmark (quality.default_rows); "
             f"in brackets the change over the published eta {PUBLISHED_ETA}.", "",
             "| task | dataset | " + " | ".join(f"eta {eta}" for eta in etas) + " |", "|---|---|" + "---:|" * len(etas)]
    for case in cases:
        published = np.mean(case["psnr"][str(PUBLISHED_ETA)])
        cells = [f"{np.mean(case['psnr'][str(eta)]):.2f} ({np.mean(case['psnr'][str(eta)]) - published:+.2f})"
                 for eta in etas]
        lines.append(f"| {case['task']} | {case['dataset']} | " + " | ".join(cells) + " |")
    quality.save_results(args.out, "eta_on_validation", cases, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
