"""Restoration quality of the bundled model on held-out real EM, against classical baselines.

    python benchmarks/quality.py [--model MODEL.onnx] [--steps 20 50] [--samples 1 4]

For each task a known truth is degraded with `df5t_deploy.degrade` (the same H and noise as
`df5t degrade`) and restored by: the degraded input itself (or its nearest-neighbour
upsampling), one fixed classical baseline, and DDRM with the model at each step count and
sample count. PSNR and SSIM (data range 255) against the truth. Held-out data only
(`export/train_data.py`): mussel tile 3 and FlyEM planes z >= 176. Writes
benchmarks/results/quality.md, quality.json and quality.png (input / baseline / ours / truth).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.ndimage
import tifffile
from df5t_deploy.export.train_data import FLYEM_HELDOUT_PLANES, FLYEM_VOLUME, MUSSEL_HELDOUT
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from df5t_deploy.api import Restorer
from df5t_deploy.degrade import blob_mask, degrade
from df5t_deploy.operators import gaussian_kernel
from df5t_deploy.tasks import TaskOptions

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SEED = 0


@dataclass
class Case:
    """One task on one held-out image: truth, measurement, and how to restore it."""

    name: str
    task: str
    truth: np.ndarray
    measured: np.ndarray
    naive: np.ndarray  # the degraded input on the truth's grid
    naive_label: str
    classical: np.ndarray
    classical_label: str
    options: dict = field(default_factory=dict)
    sigma0: float = 0.0
    extras: dict = field(default_factory=dict)  # further baselines, by label


def _images(data: Path, crop: int) -> dict[str, np.ndarray]:
    mussel = tifffile.imread(data / MUSSEL_HELDOUT)
    flyem_plane = tifffile.imread(data / FLYEM_VOLUME)[FLYEM_HELDOUT_PLANES][24]
    return {
        "mussel": mussel[1000 : 1000 + crop, 1200 : 1200 + crop],
        "flyem": flyem_plane[64 : 64 + crop, 64 : 64 + crop],
    }


def _psnr_ssim(image: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    a, b = image.astype(np.float64), truth.astype(np.float64)
    return (float(peak_signal_noise_ratio(b, a, data_range=255)),
            float(structural_similarity(b, a, data_range=255)))


def _u8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _denoise(name: str, truth: np.ndarray) -> Case:
    from skimage.restoration import denoise_nl_means, estimate_sigma

    sigma0 = 0.2
    noisy = degrade(truth, TaskOptions("denoise"), sigma0=sigma0, seed=SEED).image
    sigma = float(estimate_sigma(noisy.astype(np.float64)))
    nlm = denoise_nl_means(noisy.astype(np.float64), h=0.8 * sigma, sigma=sigma, patch_size=5, patch_distance=6)
    mean3 = _u8(scipy.ndimage.uniform_filter(noisy.astype(np.float64), 3, mode="reflect"))
    return Case(f"denoise {name}", "denoise", truth, noisy, noisy, "noisy input", _u8(nlm),
                "non-local means (estimated sigma)", {}, sigma0, {"3x3 mean filter": mean3})


def _sr(name: str, truth: np.ndarray, r: int) -> Case:
    from skimage.transform import resize

    sigma0 = 0.02
    low = degrade(truth, TaskOptions("sr", scale=r), sigma0=sigma0, seed=SEED).image
    nearest = np.repeat(np.repeat(low, r, axis=0), r, axis=1)
    bicubic = resize(low.astype(np.float64), truth.shape, order=3, mode="reflect", anti_aliasing=False)
    return Case(f"sr x{r} {name}", "sr", truth, low, nearest, "nearest upsampling", _u8(bicubic), "bicubic",
                {"scale": r}, sigma0)


def _deblur(name: str, truth: np.ndarray) -> Case:
    from skimage.restoration import richardson_lucy

    sigma0, blur = 0.02, 1.5
    blurred = degrade(truth, TaskOptions("deblur", blur_sigma=(blur, blur)), sigma0=sigma0, seed=SEED).image
    kernel = np.outer(gaussian_kernel(blur), gaussian_kernel(blur))
    pad = len(kernel)  # symmetric padding, as the blur model: no dark frame from zero padding
    padded = np.pad(blurred.astype(np.float64) / 255.0, pad, mode="symmetric")
    rl = richardson_lucy(padded, kernel, num_iter=30)[pad:-pad, pad:-pad] * 255.0
    return Case(f"deblur {name}", "deblur", truth, blurred, blurred, "blurred input", _u8(rl),
                "Richardson-Lucy (30 iterations)", {"blur_sigma": blur}, sigma0)


def _inpaint(name: str, truth: np.ndarray) -> Case:
    from skimage.restoration import inpaint_biharmonic

    sigma0 = 0.02
    missing = blob_mask(truth.shape, 0.2, SEED, blob_sigma=6.0)
    holed = degrade(truth, TaskOptions("inpaint", mask="auto"), sigma0=sigma0, seed=SEED, missing=missing).image
    biharmonic = inpaint_biharmonic(holed.astype(np.float64), missing)
    return Case(f"inpaint {name}", "inpaint", truth, holed, holed, "input with holes (0)", _u8(biharmonic),
                "biharmonic", {"mask": missing}, sigma0)


def _isotropic(data: Path, size: int, k: int = 4) -> Case:
    volume = tifffile.imread(data / FLYEM_VOLUME)[FLYEM_HELDOUT_PLANES][:64, 64 : 64 + size, 64 : 64 + size]
    sigma0 = 0.02
    acquired = degrade(volume, TaskOptions("isotropic", z_factor=k), sigma0=sigma0, seed=SEED).image
    nearest = np.repeat(acquired, k, axis=0)
    # cubic along z through the acquired planes' centres (plane i sits at i*k + (k-1)/2)
    z = (np.arange(volume.shape[0]) - (k - 1) / 2) / k
    zz, yy, xx = np.meshgrid(z, np.arange(size), np.arange(size), indexing="ij")
    cubic = scipy.ndimage.map_coordinates(acquired.astype(np.float64), [zz, yy, xx], order=3, mode="nearest")
    return Case("isotropic k=4 flyem", "isotropic", volume, acquired, nearest, "nearest (planes repeated)",
                _u8(cubic), "cubic along z", {"z_factor": k}, sigma0)


def build_cases(data: Path, crop: int, volume_size: int) -> list[Case]:
    cases = []
    for name, truth in _images(data, crop).items():
        cases += [_denoise(name, truth), _sr(name, truth, 2), _sr(name, truth, 4), _deblur(name, truth),
                  _inpaint(name, truth)]
    cases.append(_isotropic(data, volume_size))
    return cases


def restore(case: Case, model: str | None, steps: int, samples: int) -> np.ndarray:
    restorer = Restorer(model, case.task, sigma0=case.sigma0, steps=steps, samples=samples, seed=SEED, **case.options)
    return restorer.restore(case.measured)


def run(cases: list[Case], model: str | None, steps_list: list[int], samples_list: list[int],
        log: Callable[[str], None] = print) -> tuple[list[dict], dict]:
    rows, shown = [], {}
    for case in cases:
        methods = {case.naive_label: case.naive, case.classical_label: case.classical, **case.extras}
        for steps in steps_list:
            for samples in samples_list:
                started = time.perf_counter()
                label = f"DDRM {steps} steps, {samples} sample{'s' if samples > 1 else ''}"
                methods[label] = restore(case, model, steps, samples)
                log(f"  {case.name}: {label} in {time.perf_counter() - started:.0f} s")
        for label, image in methods.items():
            psnr, ssim = _psnr_ssim(image, case.truth)
            rows.append({"case": case.name, "method": label, "psnr": round(psnr, 2), "ssim": round(ssim, 4)})
        best = f"DDRM {max(steps_list)} steps, {max(samples_list)} sample{'s' if max(samples_list) > 1 else ''}"
        shown[case.name] = (case.naive, case.classical, methods[best], case.truth)
    return rows, shown


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "", "| case | method | PSNR (dB) | SSIM |", "|---|---|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['case']} | {row['method']} | {row['psnr']:.2f} | {row['ssim']:.4f} |")
    lines += ["", "## Who wins (PSNR, best DDRM setting against the degraded input and the classical baseline)", ""]
    lines += summary(rows)
    return "\n".join(lines) + "\n"


def summary(rows: list[dict]) -> list[str]:
    """One line per case: best DDRM vs the degraded input and vs the best non-DDRM method."""
    lines = []
    for case in dict.fromkeys(row["case"] for row in rows):
        mine = [r for r in rows if r["case"] == case]
        ddrm = max((r for r in mine if r["method"].startswith("DDRM")), key=lambda r: r["psnr"])
        naive = mine[0]
        classical = max((r for r in mine[1:] if not r["method"].startswith("DDRM")), key=lambda r: r["psnr"])
        verdict = "DDRM wins" if ddrm["psnr"] > classical["psnr"] else f"{classical['method']} wins"
        lines.append(f"- {case}: {verdict}. {ddrm['method']} {ddrm['psnr']:.2f} dB vs {classical['method']} "
                     f"{classical['psnr']:.2f} dB; the degraded input {naive['psnr']:.2f} dB "
                     f"({'improved' if ddrm['psnr'] > naive['psnr'] else 'NOT improved'}).")
    return lines


def figure(shown: dict, path: Path) -> None:
    from PIL import Image, ImageDraw

    rows = []
    for name, images in shown.items():
        # volumes are shown as their middle XZ section, where the z restoration is visible
        crops = [im[:, im.shape[1] // 2, :] if im.ndim == 3 else im for im in images]
        strip = np.concatenate([np.pad(_u8(c.astype(np.float64)), 2, constant_values=255) for c in crops], axis=1)
        canvas = Image.fromarray(np.concatenate([np.full((14, strip.shape[1]), 255, np.uint8), strip]))
        ImageDraw.Draw(canvas).text((2, 1), name, fill=0)
        rows.append(np.asarray(canvas))
    width = max(r.shape[1] for r in rows)
    header = Image.fromarray(np.full((14, width), 255, np.uint8))
    ImageDraw.Draw(header).text((2, 1), "columns: input | classical baseline | DDRM (most steps, samples) | truth", fill=0)
    sheet = np.concatenate([np.asarray(header)] + [np.pad(r, ((0, 0), (0, width - r.shape[1])), constant_values=255)
                                                   for r in rows])
    Image.fromarray(sheet).save(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "em")
    parser.add_argument("--model", default=None, help="ONNX artifact (default: the bundled df5t-tiny-em)")
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--volume-size", type=int, default=48)
    parser.add_argument("--steps", type=int, nargs="+", default=[20, 50])
    parser.add_argument("--samples", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    cases = build_cases(args.data, args.crop, args.volume_size)
    rows, shown = run(cases, args.model, args.steps, args.samples)
    args.out.mkdir(parents=True, exist_ok=True)
    header = (f"# Restoration quality on held-out real EM\n\nModel: {args.model or 'bundled df5t-tiny-em'}; "
              f"crops {args.crop} x {args.crop} (isotropic: 64 x {args.volume_size} x {args.volume_size}); seed {SEED}; "
              f"command: `python benchmarks/quality.py` ({time.perf_counter() - started:.0f} s on this machine).")
    (args.out / "quality.md").write_text(markdown(rows, header))
    (args.out / "quality.json").write_text(json.dumps({"rows": rows, "args": {k: str(v) for k, v in vars(args).items()}}, indent=2) + "\n")
    figure(shown, args.out / "quality.png")
    print(markdown(rows, header))


if __name__ == "__main__":
    main()
