"""Restoration quality on held-out real EM: DDRM at fixed settings against tuned classical methods.

    python benchmarks/quality.py            # the full run (writes results/quality.* and the README's table)
    python benchmarks/quality.py --smoke    # a few crops and steps: checks the benchmark runs (CI)
    python benchmarks/quality.py --model M.onnx --task denoise --rows 20x4   # a partial run

A partial run (``--smoke``, ``--task``, ``--rows``) writes to ``results/partial/`` (git-ignored)
unless ``--out`` says otherwise, and never the README's table: it cannot replace the full results.

Datasets, all held out from training (``export/train_data.py``): the mussel tile 3, FlyEM
planes z >= 176 and ISBI 2012 (its terms: test data only, never training). Each is split
into validation and test parts (other rows or planes). For every task and dataset a truth
crop is degraded with ``df5t_deploy.degrade`` (the same H and noise as ``df5t degrade``), one
seed per crop, at ``CROPS`` random places on several planes or regions of the test part.

Every classical method is tuned by a grid search on ``VALIDATION_CROPS`` crops of the
validation part, never on test crops; DDRM runs at settings fixed in advance (20 steps and 4
samples, with the Restorer's default final step; denoising at the Restorer's defaults, chosen
on validation crops by ``walk_frontier.py``), never the best of several on the test crops.
Reported: mean and standard deviation of PSNR and SSIM (data range 255) over the test crops,
and DDRM's paired PSNR difference to the best classical method on the same crops.

BM3D comes from the ``bm3d`` package (non-commercial licence): this benchmark installs it for
itself; the package never depends on it.

Also measured: how well ``--sigma0 auto`` and the Poisson-Gaussian fit recover noise of a known
level added to real EM, which carries noise of its own; the estimate is fitted as intrinsic
plus added (sigma_est^2 = slope * sigma_added^2 + sigma_intrinsic^2; gain_est = slope * gain +
intrinsic), so a slope of 1 means the added noise is recovered exactly.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.ndimage
import tifffile

from df5t_deploy.api import Restorer
from df5t_deploy.degrade import blob_mask, degrade
from df5t_deploy.export.train_data import FLYEM_HELDOUT_PLANES, FLYEM_VOLUME, MUSSEL_HELDOUT
from df5t_deploy.noise_estimate import estimate_noise_std
from df5t_deploy.operators import gaussian_kernel
from df5t_deploy.poisson_gaussian import PoissonGaussian, fit_poisson_gaussian
from df5t_deploy.settings import (
    DEFAULT_FINAL_STEP,
    DEFAULT_WALK,
    FINAL_STEPS,
    PUBLISHED_FINAL_STEP,
    PUBLISHED_WALK,
    WALKS,
    default_samples,
    default_steps,
    eta_defaults,
)
from df5t_deploy.streaming import ArraySource
from df5t_deploy.tasks import TaskOptions

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
PARTIAL_RESULTS = RESULTS / "partial"
README = REPO / "README.md"
ISBI_VOLUME = "sstem_isbi2012_30x512x512.tif"
CROPS, VALIDATION_CROPS, CROP = 8, 4, 64
#: Test crops are degraded with seeds from case_seed + TEST_SEED_OFFSET on.
TEST_SEED_OFFSET = 500
VOLUME_CROP, Z_FACTOR = 24, 4
#: DDRM's fixed settings, one row each: (steps, samples), and after them the departures from the
#: published sampler where there are any: a final step other than the published one, then a walk
#: other than the published full one, e.g. ``--rows 20x4:weighted`` or ``--rows 2x4:weighted:matched``.
#: By default each task runs one row (``default_rows``): the Restorer's defaults for denoising,
#: whose matched walk makes them cheap; for the other tasks, whose walk is the full one, the
#: Restorer's defaults but 20 steps x 4 samples (the published 50 steps cost 2.5 times as much,
#: and ``--rows 50x4:weighted`` adds them).
FULL_WALK_ROW = (20, 4, DEFAULT_FINAL_STEP)
ROW_DEFAULTS = (PUBLISHED_FINAL_STEP, PUBLISHED_WALK)  # what a row without departures runs
SIGMA0 = {"denoise": 0.2, "sr": 0.02, "deblur": 0.02, "inpaint": 0.02, "isotropic": 0.02}
BLUR_SIGMA, SR_SCALE, MISSING_FRACTION = 1.5, 2, 0.2
#: Detector noise of the Poisson-Gaussian case, in grey levels (the truth's 0..255).
DETECTOR = PoissonGaussian(gain=4.0, read_noise=6.0, offset=0.0)
README_BEGIN, README_END = "<!-- quality table: written by benchmarks/quality.py -->", "<!-- end of quality table -->"


# ---------------------------------------------------------------- data


@dataclass(frozen=True)
class Dataset:
    """A held-out stack, split by planes or rows into validation and test parts."""

    name: str
    volume: np.ndarray  # ZYX
    validation: tuple[slice, slice]  # (planes, rows)
    test: tuple[slice, slice]

    def crops(self, split: str, count: int, size: int, seed: int, depth: int = 1) -> list[np.ndarray]:
        """``count`` crops [depth, size, size] at random places of the part (squeezed for depth 1)."""
        planes, rows = getattr(self, split)
        z_range = range(*planes.indices(self.volume.shape[0]))
        y_range = range(*rows.indices(self.volume.shape[1]))
        rng = np.random.default_rng(seed)
        crops = []
        for _ in range(count):
            z = rng.integers(z_range.start, z_range.stop - depth + 1)
            y = rng.integers(y_range.start, y_range.stop - size + 1)
            x = rng.integers(0, self.volume.shape[2] - size + 1)
            crop = self.volume[z : z + depth, y : y + size, x : x + size]
            crops.append(crop[0] if depth == 1 else crop)
        return crops


def datasets(data: Path) -> list[Dataset]:
    mussel = tifffile.imread(data / MUSSEL_HELDOUT)[None]
    flyem = tifffile.imread(data / FLYEM_VOLUME)
    isbi = tifffile.imread(data / ISBI_VOLUME)
    held = FLYEM_HELDOUT_PLANES.start
    return [
        Dataset("mussel", mussel, (slice(0, 1), slice(0, 600)), (slice(0, 1), slice(700, None))),
        Dataset("FlyEM", flyem, (slice(held, held + VOLUME_CROP), slice(None)), (slice(held + VOLUME_CROP, None), slice(None))),
        Dataset("ISBI", isbi, (slice(0, 8), slice(None)), (slice(10, None), slice(None))),
    ]


# ---------------------------------------------------------------- tasks


@dataclass
class Task:
    """A degradation, DDRM's settings for it, and the classical methods with their grids."""

    name: str
    restorer_task: str
    degrade: Callable[[np.ndarray, int], tuple[np.ndarray, dict]]  # truth, seed -> measured, per-crop info
    classical: dict[str, tuple[Callable, list]]  # label -> (method(measured, info, parameter), grid)
    settings: dict = field(default_factory=dict)
    depth: int = 1
    datasets: tuple[str, ...] = ("mussel", "FlyEM", "ISBI")


def _grey_noise_std(task: str) -> float:
    return SIGMA0[task] * 255 / 2


def _degrade_with(task: str, **options) -> Callable:
    def run(truth: np.ndarray, seed: int) -> tuple[np.ndarray, dict]:
        missing = blob_mask(truth.shape, MISSING_FRACTION, seed, blob_sigma=4.0) if task == "inpaint" else None
        opts = TaskOptions(task, mask="auto" if task == "inpaint" else None, **options)
        measured = degrade(truth, opts, sigma0=SIGMA0[task], seed=seed, missing=missing).image
        return measured, {"mask": missing} if missing is not None else {}

    return run


def _detector_noise(truth: np.ndarray, seed: int) -> tuple[np.ndarray, dict]:
    # float32: a detector's counts are not clipped at the truth's 8-bit range
    return degrade(truth.astype(np.float32), TaskOptions("denoise"), seed=seed, poisson_gaussian=DETECTOR).image, {}


def _gaussian(measured, info, sigma):
    return scipy.ndimage.gaussian_filter(measured.astype(np.float64), sigma, mode="reflect")


def _tv(measured, info, weight):
    from skimage.restoration import denoise_tv_chambolle

    return denoise_tv_chambolle(measured.astype(np.float64) / 255.0, weight=weight) * 255.0


def _nlm(measured, info, h_and_patch):
    from skimage.restoration import denoise_nl_means

    h, patch = h_and_patch
    sigma = _grey_noise_std("denoise")
    return denoise_nl_means(measured.astype(np.float64), h=h * sigma, sigma=sigma, patch_size=patch,
                            patch_distance=6, fast_mode=True)


def _bm3d(measured, info, factor):
    import bm3d

    return bm3d.bm3d(measured.astype(np.float64), sigma_psd=factor * _grey_noise_std("denoise"))


def _bm3d_anscombe(measured, info, factor):
    """BM3D in the generalised Anscombe domain (unit noise), back by the exact unbiased inverse,
    with the true detector parameters: the classical Poisson-Gaussian pipeline."""
    import bm3d

    stabilized = DETECTOR.anscombe(measured)
    return DETECTOR.exact_unbiased_inverse(bm3d.bm3d(stabilized, sigma_psd=factor))


def _resize(measured, info, order):
    from skimage.transform import resize

    size = (measured.shape[0] * SR_SCALE, measured.shape[1] * SR_SCALE)
    return resize(measured.astype(np.float64), size, order=order, mode="reflect", anti_aliasing=False)


def _lanczos(measured, info, _):
    from PIL import Image

    size = (measured.shape[1] * SR_SCALE, measured.shape[0] * SR_SCALE)
    return np.asarray(Image.fromarray(measured.astype(np.float32), mode="F").resize(size, Image.Resampling.LANCZOS))


def _blur_kernel() -> np.ndarray:
    return np.outer(gaussian_kernel(BLUR_SIGMA), gaussian_kernel(BLUR_SIGMA))


def _deconvolved(measured: np.ndarray, deconvolve: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """``deconvolve`` of the measurement on [0, 1], padded symmetrically as the blur model (no
    dark frame from zero padding), cropped back, in grey levels."""
    pad = len(_blur_kernel())
    padded = np.pad(measured.astype(np.float64) / 255.0, pad, mode="symmetric")
    return deconvolve(padded)[pad:-pad, pad:-pad] * 255.0


def _richardson_lucy(measured, info, iterations):
    from skimage.restoration import richardson_lucy

    return _deconvolved(measured, lambda p: richardson_lucy(p, _blur_kernel(), num_iter=iterations, clip=False))


def _wiener(measured, info, balance):
    from skimage.restoration import wiener

    return _deconvolved(measured, lambda p: wiener(p, _blur_kernel(), balance, clip=False))


def _biharmonic(measured, info, _):
    from skimage.restoration import inpaint_biharmonic

    return inpaint_biharmonic(measured.astype(np.float64), info["mask"])


def _along_z(measured, info, order):
    """Spline interpolation along z through the acquired planes' centres (plane i of the
    acquisition sits at i * k + (k - 1) / 2 on the isotropic grid)."""
    k = Z_FACTOR
    z = (np.arange(measured.shape[0] * k) - (k - 1) / 2) / k
    zz, yy, xx = np.meshgrid(z, np.arange(measured.shape[1]), np.arange(measured.shape[2]), indexing="ij")
    return scipy.ndimage.map_coordinates(measured.astype(np.float64), [zz, yy, xx], order=order, mode="nearest")


def tasks() -> list[Task]:
    denoisers = {
        "Gaussian filter": (_gaussian, [0.6, 0.8, 1.0, 1.2, 1.4, 1.7, 2.0]),
        "total variation": (_tv, [0.04, 0.06, 0.08, 0.1, 0.13, 0.16, 0.2]),
        "non-local means": (_nlm, list(itertools.product([0.4, 0.6, 0.8, 1.0], [3, 5, 7]))),
        "BM3D": (_bm3d, [0.8, 1.0, 1.2, 1.4]),
    }
    return [
        Task("denoise", "denoise", _degrade_with("denoise"), denoisers, {"sigma0": SIGMA0["denoise"]}),
        Task("denoise, Poisson-Gaussian", "denoise", _detector_noise, {
            "Gaussian filter": denoisers["Gaussian filter"],
            "BM3D, Anscombe domain": (_bm3d_anscombe, [0.8, 1.0, 1.2, 1.4]),
        }, {"noise_model": "poisson-gaussian", "gain": DETECTOR.gain, "read_noise": DETECTOR.read_noise,
            "offset": DETECTOR.offset}),  # the true parameters, as BM3D's pipeline has them
        Task("sr x2", "sr", _degrade_with("sr", scale=SR_SCALE), {
            "bicubic": (_resize, [3]), "Lanczos": (_lanczos, [None]),
        }, {"sigma0": SIGMA0["sr"], "scale": SR_SCALE}),
        Task("deblur", "deblur", _degrade_with("deblur", blur_sigma=(BLUR_SIGMA, BLUR_SIGMA)), {
            "Richardson-Lucy": (_richardson_lucy, [5, 10, 20, 30, 50, 80]),
            "Wiener": (_wiener, [0.003, 0.01, 0.03, 0.1]),
        }, {"sigma0": SIGMA0["deblur"], "blur_sigma": BLUR_SIGMA}),
        Task("inpaint", "inpaint", _degrade_with("inpaint"), {"biharmonic": (_biharmonic, [None])},
             {"sigma0": SIGMA0["inpaint"]}),
        Task(f"isotropic k={Z_FACTOR}", "isotropic", _degrade_with("isotropic", z_factor=Z_FACTOR),
             {"spline along z": (_along_z, [1, 3, 5])}, {"sigma0": SIGMA0["isotropic"], "z_factor": Z_FACTOR},
             depth=VOLUME_CROP, datasets=("FlyEM",)),
    ]


# ---------------------------------------------------------------- measuring


def psnr_ssim(image: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    a = np.clip(image.astype(np.float64), 0, 255)
    b = truth.astype(np.float64)
    return float(peak_signal_noise_ratio(b, a, data_range=255)), float(structural_similarity(b, a, data_range=255))


def _score(method, pairs, parameter) -> float:
    return float(np.mean([psnr_ssim(method(measured, info, parameter), truth)[0] for truth, measured, info in pairs]))


def tune(task: Task, validation: list) -> dict[str, object]:
    """Each classical method's parameter with the best mean PSNR on the validation crops."""
    return {label: max(grid, key=lambda p: _score(method, validation, p)) for label, (method, grid) in
            task.classical.items()}


def case_seed(task: Task, dataset: Dataset) -> int:
    """The seed of a task's validation crops on a dataset: fixed, and distinct across cases."""
    return 1000 * len(task.name) + sum(map(ord, dataset.name))


def pairs(task: Task, dataset: Dataset, split: str, count: int, seed: int) -> list:
    """(truth, measured, info) for ``count`` crops of a part; crop i is degraded with seed + i."""
    crops = dataset.crops(split, count, VOLUME_CROP if task.depth > 1 else CROP, seed, task.depth)
    return [(truth, *task.degrade(truth, seed + i)) for i, truth in enumerate(crops)]


def default_rows(task: Task) -> tuple[tuple, ...]:
    """A task's DDRM rows when ``--rows`` gives none (``FULL_WALK_ROW``)."""
    if task.restorer_task == "denoise":
        steps, samples = default_steps("denoise"), default_samples("denoise")
        return (_without_published_tail((steps, samples, DEFAULT_FINAL_STEP, DEFAULT_WALK)),)
    return (FULL_WALK_ROW,)


def _full_row(row: tuple) -> tuple:
    """(steps, samples, final_step, walk), the published ones where the row names none."""
    return (*row, *ROW_DEFAULTS[len(row) - 2:])


def _without_published_tail(row: tuple) -> tuple:
    """The row with the published values at its end left out: a row names only departures."""
    row = tuple(row)
    while len(row) > 2 and row[-1] == ROW_DEFAULTS[len(row) - 3]:
        row = row[:-1]
    return row


def ddrm_restore(task: Task, measured: np.ndarray, info: dict, row: tuple, model, seed: int,
                 **overrides) -> np.ndarray:
    """``measured`` restored by the Restorer as ``row`` runs it; ``overrides`` are further
    Restorer arguments (what a study varies)."""
    steps, samples, final_step, walk = _full_row(row)
    restorer = Restorer(model, task.restorer_task, **{
        "steps": steps, "samples": samples, "seed": seed, "final_step": final_step, "walk": walk,
        "mask": info.get("mask"), **task.settings, **overrides})
    return restorer.restore(measured)


def ddrm_row(text: str) -> tuple:
    """``20x4`` -> (20 steps, 4 samples); ``20x4:weighted`` -> (20, 4, "weighted");
    ``2x4:weighted:matched`` -> (2, 4, "weighted", "matched"). A row names its departures from
    the published sampler, so that results files keep their meaning when the Restorer's
    defaults change."""
    match = re.fullmatch(rf"(\d+)x(\d+)(?::({'|'.join(FINAL_STEPS)}))?(?::({'|'.join(WALKS)}))?", text)
    if not match or min(map(int, match.groups()[:2])) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not STEPSxSAMPLES[:FINAL_STEP[:WALK]], e.g. 20x4, "
                                         "20x4:weighted or 2x4:weighted:matched")
    steps, samples, final_step, walk = int(match[1]), int(match[2]), match[3], match[4]
    return _without_published_tail((steps, samples, final_step or PUBLISHED_FINAL_STEP, walk or PUBLISHED_WALK))


def row_text(row: tuple) -> str:
    """A row as ``--rows`` takes it: the inverse of ``ddrm_row``."""
    steps, samples, *departures = _without_published_tail(row)
    return ":".join([f"{steps}x{samples}", *departures])


def ddrm_label(*row) -> str:
    steps, samples, final_step, walk = _full_row(row)
    label = f"DDRM {steps} steps x {samples}"
    if final_step != PUBLISHED_FINAL_STEP:
        label += f", {final_step} final step"
    return label if walk == PUBLISHED_WALK else f"{label}, {walk} walk"


def run_case(task: Task, dataset: Dataset, args, log) -> tuple[dict, list[np.ndarray]]:
    """Scores per method and crop on the test crops of one task and dataset, and the first
    crop's images for the figure (input, best classical, DDRM's first row, truth)."""
    seed = case_seed(task, dataset)
    tuned = tune(task, pairs(task, dataset, "validation", args.validation_crops, seed))
    test = pairs(task, dataset, "test", args.crops, seed + TEST_SEED_OFFSET)
    scores: dict[str, list] = {}
    first: dict[str, np.ndarray] = {}

    def scored(label: str, outputs) -> None:
        scores[label] = []
        for (truth, _, _), output in zip(test, outputs):
            first.setdefault(label, output)
            scores[label].append(psnr_ssim(output, truth))

    for label, (method, _) in task.classical.items():
        scored(label, (method(measured, info, tuned[label]) for _, measured, info in test))
    timings = {}
    rows = args.ddrm_rows or default_rows(task)
    for row in rows:
        started, label = time.perf_counter(), ddrm_label(*row)
        scored(label, (ddrm_restore(task, measured, info, row, args.model, seed + TEST_SEED_OFFSET + i)
                       for i, (_, measured, info) in enumerate(test)))
        timings[label] = round(time.perf_counter() - started, 1)
        log(f"  {task.name}, {dataset.name}: {label} on {len(test)} crops in {timings[label]:.0f} s")
    case = {"task": task.name, "dataset": dataset.name, "ddrm_rows": [list(row) for row in rows],
            "tuned": {k: _jsonable(v) for k, v in tuned.items()},
            "scores": {label: [[round(p, 3), round(s, 4)] for p, s in values] for label, values in scores.items()},
            "ddrm_seconds": timings}
    truth, measured, _ = test[0]
    shown = measured if measured.shape == truth.shape else scipy.ndimage.zoom(
        measured.astype(np.float64), np.array(truth.shape) / np.array(measured.shape), order=0)
    example = [shown, first[summary(case)["best_classical"]], first[ddrm_label(*rows[0])], truth]
    return case, example


def _jsonable(value):
    return list(value) if isinstance(value, tuple) else value


# ---------------------------------------------------------------- noise estimates


def _fit_line(added: np.ndarray, estimated: np.ndarray) -> tuple[float, float]:
    slope, intercept = np.polyfit(added, estimated, 1)
    return float(slope), float(intercept)


def noise_estimates(sets: list[Dataset], size: int, seed: int) -> list[dict]:
    """sigma0 auto and the Poisson-Gaussian fit on test crops with known added noise."""
    levels = np.array([5.0, 10.0, 15.0, 20.0, 30.0, 40.0])
    detectors = [PoissonGaussian(g, r, 0.0) for g, r in ((1, 2), (2, 3), (4, 4), (6, 6), (8, 8), (12, 10))]
    rows = []
    for dataset in sets:
        crops = dataset.crops("test", 2, size, seed)
        sigma_est, gains, reads = [], [], []
        for level in levels:
            estimates = []
            for i, crop in enumerate(crops):
                noisy = degrade(crop.astype(np.float32), TaskOptions("denoise"), noise_std=level, seed=seed + i).image
                estimates.append(estimate_noise_std(ArraySource(noisy)))
            sigma_est.append(np.mean(np.square(estimates)))
        refused = 0
        for detector in detectors:
            fitted = []
            for i, crop in enumerate(crops):
                noisy = degrade(crop.astype(np.float32), TaskOptions("denoise"), seed=seed + i,
                                poisson_gaussian=detector).image
                try:
                    fitted.append(fit_poisson_gaussian([noisy], noisy.dtype))
                except ValueError:
                    refused += 1
            gains.append((detector.gain, np.mean([f.gain for f in fitted]) if fitted else np.nan))
            reads.append((detector.read_noise, np.mean([f.read_noise**2 for f in fitted]) if fitted else np.nan))
        sigma_slope, sigma_intrinsic2 = _fit_line(levels**2, np.array(sigma_est))
        g = np.array([row for row in gains if np.isfinite(row[1])])
        r = np.array([row for row in reads if np.isfinite(row[1])])
        gain_slope, gain_intrinsic = _fit_line(g[:, 0], g[:, 1])
        read_slope, read_intrinsic2 = _fit_line(r[:, 0] ** 2, r[:, 1])
        rows.append({"dataset": dataset.name, "sigma_slope": round(sigma_slope, 3),
                     "sigma_intrinsic": round(float(np.sqrt(max(sigma_intrinsic2, 0.0))), 2),
                     "gain_slope": round(gain_slope, 3), "gain_intrinsic": round(gain_intrinsic, 2),
                     "read_variance_slope": round(read_slope, 3), "read_intrinsic_variance": round(read_intrinsic2, 1),
                     "refused": refused, "fits": len(detectors) * len(crops)})
    return rows


# ---------------------------------------------------------------- reporting


def summary(case: dict) -> dict:
    """Per method: mean and sd of PSNR and SSIM; per DDRM row: the paired difference to the best
    classical method (by mean test PSNR) on the same crops."""
    stats = {}
    for label, values in case["scores"].items():
        v = np.array(values)
        stats[label] = {"psnr": float(v[:, 0].mean()), "psnr_sd": float(v[:, 0].std(ddof=1)) if len(v) > 1 else 0.0,
                        "ssim": float(v[:, 1].mean()), "ssim_sd": float(v[:, 1].std(ddof=1)) if len(v) > 1 else 0.0,
                        "crops": len(v)}
    classical = [label for label in case["scores"] if not label.startswith("DDRM")]
    best = max(classical, key=lambda label: stats[label]["psnr"])
    for label in case["scores"]:
        if label.startswith("DDRM"):
            ours = np.array(case["scores"][label])[:, 0]
            theirs = np.array(case["scores"][best])[:, 0]
            diff = ours - theirs
            stats[label]["vs_best"] = {"method": best, "mean": float(diff.mean()),
                                       "sd": float(diff.std(ddof=1)) if len(diff) > 1 else 0.0,
                                       "won": int((diff > 0).sum()), "crops": len(diff)}
    return {"best_classical": best, "methods": stats}


def _tuned_text(value) -> str:
    if value is None:
        return ""
    return f" ({', '.join(map(str, value))})" if isinstance(value, list) else f" ({value})"


def markdown(results: dict) -> str:
    lines = [f"# Restoration quality on held-out real EM\n\n{results['header']}\n",
             "| task | dataset | method (tuned parameter) | PSNR (dB) | SSIM | paired vs best classical (dB, crops won) |",
             "|---|---|---|---:|---:|---|"]
    for case in results["cases"]:
        s = summary(case)
        for label, m in s["methods"].items():
            vs = m.get("vs_best")
            paired = f"{vs['mean']:+.2f} ± {vs['sd']:.2f} vs {vs['method']} ({vs['won']}/{vs['crops']})" if vs else ""
            lines.append(f"| {case['task']} | {case['dataset']} | {label}{_tuned_text(case['tuned'].get(label))} "
                         f"| {m['psnr']:.2f} ± {m['psnr_sd']:.2f} | {m['ssim']:.3f} ± {m['ssim_sd']:.3f} | {paired} |")
    lines += ["", "## Noise estimates on real EM with known added noise", "", noise_table(results["noise_estimates"])]
    return "\n".join(lines) + "\n"


def noise_table(rows: list[dict]) -> str:
    lines = ["| dataset | sigma0 auto: slope, intrinsic std | Poisson-Gaussian gain: slope, intrinsic "
             "| read-noise variance: slope, intrinsic | fits refused |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dataset']} | {r['sigma_slope']:.2f}, {r['sigma_intrinsic']:.1f} "
                     f"| {r['gain_slope']:.2f}, {r['gain_intrinsic']:+.2f} "
                     f"| {r['read_variance_slope']:.2f}, {r['read_intrinsic_variance']:+.0f} "
                     f"| {r['refused']}/{r['fits']} |")
    return "\n".join(lines)


def readme_block(results: dict) -> str:
    """The README's quality table: each case's first DDRM row against the best tuned classical
    method."""
    lines = [README_BEGIN, "", results["header"], "",
             "| task | dataset | best tuned classical (dB) | DDRM row | DDRM (dB) | paired difference (dB, crops won) |",
             "|---|---|---|---|---|---|"]
    wins = 0
    for case in results["cases"]:
        s = summary(case)
        label = ddrm_label(*case["ddrm_rows"][0])
        best, ours = s["methods"][s["best_classical"]], s["methods"][label]
        vs = ours["vs_best"]
        wins += vs["mean"] > 0
        lines.append(f"| {case['task']} | {case['dataset']} | {s['best_classical']} {best['psnr']:.2f} "
                     f"| {label.removeprefix('DDRM ')} | {ours['psnr']:.2f} "
                     f"| {vs['mean']:+.2f} ± {vs['sd']:.2f} ({vs['won']}/{vs['crops']}) |")
    lines.append(f"\nDDRM beats the best tuned classical method on average in {wins} of {len(results['cases'])} "
                 "cases.")
    lines += ["", "Noise estimates on real EM with known added noise (slope 1: the added noise is recovered):", "",
              noise_table(results["noise_estimates"]), "", README_END]
    return "\n".join(lines)


def write_readme(block: str, begin: str = README_BEGIN, end: str = README_END, readme: Path = README) -> None:
    """Put ``block`` (which starts with ``begin`` and ends with ``end``) in place of the
    README's text between those markers."""
    text = readme.read_text()
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{readme} has no markers {begin} ... {end}")
    readme.write_text(pattern.sub(lambda _: block, text))


def figure(examples: list[tuple[str, list[np.ndarray]]], path: Path) -> None:
    from PIL import Image, ImageDraw

    rows = []
    for name, images in examples:
        crops = [im[:, im.shape[1] // 2, :] if im.ndim == 3 else im for im in images]  # volumes: an XZ section
        height = max(c.shape[0] for c in crops)
        padded = [np.pad(np.clip(np.rint(c), 0, 255).astype(np.uint8), ((0, height - c.shape[0]), (2, 2)),
                         constant_values=255) for c in crops]
        strip = np.concatenate(padded, axis=1)
        canvas = Image.fromarray(np.concatenate([np.full((14, strip.shape[1]), 255, np.uint8), strip]))
        ImageDraw.Draw(canvas).text((2, 1), name, fill=0)
        rows.append(np.asarray(canvas))
    width = max(r.shape[1] for r in rows)
    header = Image.fromarray(np.full((14, width), 255, np.uint8))
    ImageDraw.Draw(header).text((2, 1), "input | best tuned classical | DDRM (first row) | truth", fill=0)
    sheet = [np.asarray(header)] + [np.pad(r, ((0, 0), (0, width - r.shape[1])), constant_values=255) for r in rows]
    Image.fromarray(np.concatenate(sheet)).save(path)


def save_results(folder: Path, stem: str, data, markdown_text: str) -> None:
    """``stem``.json (the data) and ``stem``.md (the report) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.json").write_text(json.dumps(data, indent=1) + "\n")
    (folder / f"{stem}.md").write_text(markdown_text + "\n")


def ensure_bm3d() -> None:
    """BM3D is this benchmark's alone (non-commercial licence): installed here, never a dependency."""
    try:
        import bm3d  # noqa: F401
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "bm3d"], check=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "em")
    parser.add_argument("--model", default=None, help="ONNX artifact (default: the bundled model)")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default benchmarks/results; a partial run's: benchmarks/results/partial)")
    parser.add_argument("--smoke", action="store_true",
                        help="2 test and 2 validation crops, DDRM at 3 steps x 2: checks that the benchmark runs")
    parser.add_argument("--task", action="append", dest="tasks", choices=[task.name for task in tasks()],
                        help="only this task (repeatable), e.g. to check a model in training")
    parser.add_argument("--rows", action="append", type=ddrm_row, metavar="STEPSxSAMPLES[:FINAL_STEP[:WALK]]",
                        help="DDRM's rows for every task instead of each task's own (repeatable; default: "
                             f"{row_text(default_rows(tasks()[0])[0])} for denoising, {row_text(FULL_WALK_ROW)} "
                             "for the other tasks)")
    args = parser.parse_args(argv)
    # A partial run never replaces the full results or the README's table.
    partial = bool(args.smoke or args.tasks or args.rows)
    args.out = args.out or (PARTIAL_RESULTS if partial else RESULTS)
    args.crops, args.validation_crops = (2, 2) if args.smoke else (CROPS, VALIDATION_CROPS)
    args.ddrm_rows = tuple(args.rows or (((3, 2, DEFAULT_FINAL_STEP),) if args.smoke else ()))
    ensure_bm3d()
    started = time.perf_counter()
    sets = {d.name: d for d in datasets(args.data)}
    cases, examples = [], []
    for task in tasks():
        if args.tasks and task.name not in args.tasks:
            continue
        for name in task.datasets:
            case, example = run_case(task, sets[name], args, print)
            cases.append(case)
            if name == "FlyEM":
                examples.append((f"{task.name}, {name}", example))
    estimates = noise_estimates(list(sets.values()), 64 if args.smoke else 256, seed=7)
    command = " ".join(["python benchmarks/quality.py", *(argv if argv is not None else sys.argv[1:])])
    header = (f"Command: `{command}` ({time.perf_counter() - started:.0f} s on this machine's 2 CPU cores). "
              f"Model: {args.model or 'the bundled model'}. {args.crops} test crops of {CROP} x {CROP} per task and "
              f"dataset (isotropic: {VOLUME_CROP}^3, k = {Z_FACTOR}), one seed each; DDRM's eta {eta_defaults()}; "
              f"classical methods tuned on {args.validation_crops} validation crops; mean ± sd over crops.")
    results = {"header": header, "cases": cases, "noise_estimates": estimates}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "quality.md").write_text(markdown(results))
    figure(examples, args.out / "quality.png")
    if not partial:
        write_readme(readme_block(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
