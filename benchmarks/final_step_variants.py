"""How the final step "weighted" was chosen: variants compared on the quality benchmark's
validation crops (never its test crops), all finishing the same walks.

    python benchmarks/final_step_variants.py --model M.onnx [--out benchmarks/results/final-step]

For each 2D task and dataset, the ``VALIDATION_CROPS`` crops are restored once (DDRM 20 steps x
4 samples) and each sample's images are taken where the walker hands them to the final step;
the variants then finish them: the published step (the network's estimate), a full projection
onto the measurement, and ``sampler.weigh_in_measurement`` with its error estimate per band of
precision unchecked, as one estimate for all bands, and as adopted (per band, counted only
where significant). Writes final_step_variants.json and .md (mean PSNR change per variant).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from unittest import mock

import numpy as np
import quality

from df5t_deploy import group_walker, sampler
from df5t_deploy.api import Restorer

TASKS = ("denoise", "sr x2", "deblur", "inpaint")
PUBLISHED = "published (the network's estimate)"


def projection(images: np.ndarray, y: np.ndarray, op, sigma0: float) -> np.ndarray:
    """Every observed spectral coordinate set to the measurement's value."""
    v0, residual, _ = sampler.measured_residual(images, y, op, sigma0)
    return sampler.from_spectrum(v0 + residual, op)


def weighted_with(bands: int, significant_errors: float):
    def finish(images, y, op, sigma0):
        with mock.patch.object(sampler, "PRECISION_BANDS", bands), \
                mock.patch.object(sampler, "SIGNIFICANT_ERRORS", significant_errors):
            return sampler.weigh_in_measurement(images, y, op, sigma0)
    return finish


VARIANTS = {
    PUBLISHED: lambda images, y, op, sigma0: images,
    "full projection onto the measurement": projection,
    "Wiener weight, error estimated per band, unchecked": weighted_with(sampler.PRECISION_BANDS, 0.0),
    "the same, one estimate for all bands": weighted_with(1, 0.0),
    "per band, counted only where significant (adopted)": weighted_with(sampler.PRECISION_BANDS,
                                                                        sampler.SIGNIFICANT_ERRORS),
}


def walked_samples(task: quality.Task, measured: np.ndarray, info: dict, model: str, seed: int) -> tuple:
    """(images [1, S, H, W] on [0, 1], y, op, sigma0) of the one walk restoring a crop."""
    handed_over = []

    def capture(images, y, op, sigma0):
        handed_over.append((images, y, op, sigma0))
        return images

    with mock.patch.object(group_walker, "weigh_in_measurement", capture):
        Restorer(model, task.restorer_task, steps=20, samples=4, seed=seed, final_step="weighted",
                 mask=info.get("mask"), **task.settings).restore(measured)
    (walk,) = handed_over
    return walk


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=quality.REPO.parent / "shared" / "data" / "em")
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", type=Path, default=quality.RESULTS / "final-step")
    args = parser.parse_args(argv)
    cases = []
    for task in (t for t in quality.tasks() if t.name in TASKS):
        for dataset in (d for d in quality.datasets(args.data) if d.name in task.datasets):
            seed = quality.case_seed(task, dataset)
            scores = {name: [] for name in VARIANTS}
            for i, (truth, measured, info) in enumerate(
                    quality.pairs(task, dataset, "validation", quality.VALIDATION_CROPS, seed)):
                walk = walked_samples(task, measured, info, args.model, seed + i)
                for name, finish in VARIANTS.items():  # uint8 crops: the intensity map is v / 255
                    restored = finish(*walk).mean(axis=1)[0] * 255.0
                    scores[name].append(quality.psnr_ssim(restored, truth)[0])
            change = {name: float(np.mean(values) - np.mean(scores[PUBLISHED])) for name, values in scores.items()}
            cases.append({"task": task.name, "dataset": dataset.name, "psnr": scores, "change": change})
            print(f"{task.name}, {dataset.name}: " + ", ".join(f"{k}: {v:+.2f}" for k, v in change.items()), flush=True)
    lines = [f"Command: `python benchmarks/final_step_variants.py --model {args.model}`. Mean PSNR change (dB) over "
             f"the published final step on {quality.VALIDATION_CROPS} validation crops per case, DDRM 20 steps x 4; "
             "ranges over the mussel tile, FlyEM and ISBI.", "",
             "| variant | " + " | ".join(TASKS) + " |", "|---|" + "---|" * len(TASKS)]
    for name in list(VARIANTS)[1:]:
        ranges = []
        for task in TASKS:
            values = [case["change"][name] for case in cases if case["task"] == task]
            ranges.append(f"{min(values):+.2f} to {max(values):+.2f}")
        lines.append(f"| {name} | " + " | ".join(ranges) + " |")
    quality.save_results(args.out, "final_step_variants", cases, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
