"""Starting the walk from a forward-diffused classical estimate ("Come-Closer-Diffuse-Faster",
Chung et al. 2022) for the tasks whose walk is the full one, on the quality benchmark's
validation crops (never its test crops).

    python benchmarks/ccdf_on_validation.py
    python benchmarks/ccdf_on_validation.py --task deblur --steps 5 10

For super-resolution (Lanczos), deblurring (Wiener) and inpainting (biharmonic), each tuned as
the quality benchmark tunes it on these crops, the estimate's rms error e on the [-1,1] scale
is measured on the crops (where the truth is known), and DDRM starts at t_c, the smallest
timestep whose sigma_t is at least e times ``--margin``. There the initial value is DDRM's
own (REFERENCE.md section 4) but for the coordinates the measurement does not decide, which
start from the estimate's spectral coordinates plus sigma_t noise instead of pure noise (the
published initial value is this with an estimate of 0); the steps spread over [0, t_c] and
every step is DDRM's. Compared with the quality benchmark's row for the task (the full walk,
20 steps x 4 samples, weighted final step) on the same crops and seeds: mean PSNR and network
calls per pixel. Isotropic restoration (3D, two orientations) is not measured here.

The study drives the sampler's parts directly (sampler, tiling, the backend) rather than the
Restorer, which has no such start: it is the measurement that decides whether to add one.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import quality

from df5t_deploy.backends import open_backend
from df5t_deploy.intensity import intensity_map_for
from df5t_deploy.models import default_model_path
from df5t_deploy.noise import ORIENTATION_XY, NoiseKey, group_noise
from df5t_deploy.sampler import (
    DDRM,
    SamplerSettings,
    Timesteps,
    ddrm_init,
    from_channel_basis,
    state_to_image,
    to_channel_basis,
    weigh_in_measurement,
)
from df5t_deploy.settings import default_eta
from df5t_deploy.tasks import TaskOptions
from df5t_deploy.tiling import BlendedDenoiser

TASKS = {"sr x2": "Lanczos", "deblur": "Wiener", "inpaint": "biharmonic"}
SAMPLES = 4


def _operator(task: quality.Task, measured: np.ndarray, info: dict):
    opts = TaskOptions(task.restorer_task, scale=task.settings.get("scale"),
                       blur_sigma=(quality.BLUR_SIGMA,) * 2 if task.restorer_task == "deblur" else None)
    grid = opts.grid_shape(measured.shape)
    return opts.operator(grid, info.get("mask"))


def ccdf_restore(task, measured, info, estimate, error, steps, margin, denoiser, schedule, seed) -> np.ndarray:
    """The measured crop restored by DDRM started at t_c from the estimate; grey levels."""
    intensity = intensity_map_for(measured)
    op = _operator(task, measured, info)
    y = intensity.to_model(np.where(info["mask"], 0, measured) if "mask" in info else measured)[None]
    sigma0 = task.settings["sigma0"]
    settings = SamplerSettings(sigma0=sigma0, steps=steps, eta=default_eta(task.restorer_task))
    alphas_bar = np.cumprod(1.0 - schedule.betas())
    sigma_t = np.sqrt(1.0 - alphas_bar) / np.sqrt(alphas_bar)
    start = int(np.argmax(sigma_t >= error * margin))
    ddrm = DDRM(op, schedule, settings)
    ddrm.timesteps = Timesteps(schedule, steps, start)
    key = NoiseKey(seed, ORIENTATION_XY, range(0, 1))
    y_all = np.repeat(y, SAMPLES, axis=0)
    ybar = ddrm.spectral_measurement(y_all)
    x_hat = np.repeat(intensity.to_model(estimate.astype(np.float32))[None, None], 3, axis=1)
    sig = ddrm.timesteps.init_sigma
    az = to_channel_basis(group_noise(key, SAMPLES, op.shape, len(ddrm.timesteps)))
    a = az * np.float32(sig)
    grey_z = op.vt(az[:, 0])
    decided = ddrm.s * sig > sigma0
    grey = np.where(decided, ddrm_init(ybar, ddrm.s, grey_z, sig, sigma0),
                    op.vt(to_channel_basis(x_hat)[:, 0]) + sig * grey_z)
    a[:, 0] = op.v(grey)
    x = from_channel_basis(a) / np.float32(ddrm.timesteps.init_divisor)
    for plan in ddrm.timesteps:
        x = ddrm.step(plan, x, denoiser(x, plan.t), ybar, group_noise(key, SAMPLES, op.shape, plan.index))
    images = weigh_in_measurement(state_to_image(x)[None], y, op, sigma0)
    return intensity.values_from_unit(images[0].mean(axis=0))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=quality.REPO.parent / "shared" / "data" / "em")
    parser.add_argument("--model", type=Path, default=default_model_path())
    parser.add_argument("--task", action="append", dest="tasks", choices=list(TASKS))
    parser.add_argument("--steps", type=int, nargs="+", default=[2, 5, 10])
    parser.add_argument("--margin", type=float, nargs="+", default=[1.0, 2.0, 3.0])
    parser.add_argument("--out", type=Path, default=quality.RESULTS / "ccdf-on-validation")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    backend = open_backend("auto", args.model)
    denoiser = BlendedDenoiser(backend, backend.info.tile, backend.info.tile // 8, backend.preferred_batch)
    chosen = args.tasks or list(TASKS)
    cases = []
    for task in (t for t in quality.tasks() if t.name in chosen):
        method, grid = task.classical[TASKS[task.name]]
        for dataset in (d for d in quality.datasets(args.data) if d.name in task.datasets):
            seed = quality.case_seed(task, dataset)
            crops = quality.pairs(task, dataset, "validation", quality.VALIDATION_CROPS, seed)
            parameter = quality.tune(task, crops)[TASKS[task.name]]
            estimates = [method(measured, info, parameter) for _, measured, info in crops]
            error = float(np.sqrt(np.mean([np.mean(((e - truth) * 2 / 255) ** 2)
                                           for e, (truth, _, _) in zip(estimates, crops)])))
            case = {"task": task.name, "dataset": dataset.name, "estimate": TASKS[task.name],
                    "estimate_rms": error, "classical": [quality.psnr_ssim(e, t)[0] for e, (t, _, _) in
                                                         zip(estimates, crops)],
                    "baseline": [quality.psnr_ssim(quality.ddrm_restore(task, m, info, quality.FULL_WALK_ROW, args.model,
                                                                         seed + i, backend=backend), t)[0]
                                 for i, (t, m, info) in enumerate(crops)], "ccdf": {}}
            for steps in args.steps:
                for margin in args.margin:
                    case["ccdf"][f"{steps}x{SAMPLES}, margin {margin:g}"] = [
                        quality.psnr_ssim(ccdf_restore(task, m, info, e, error, steps, margin, denoiser,
                                                       backend.info.schedule, seed + i), t)[0]
                        for i, ((t, m, info), e) in enumerate(zip(crops, estimates))]
            cases.append(case)
            print(f"{task.name}, {dataset.name}: estimate rms {error:.3f}; classical {np.mean(case['classical']):.2f}, "
                  f"full 20 x 4 {np.mean(case['baseline']):.2f}, "
                  + ", ".join(f"{k} {np.mean(v):.2f}" for k, v in case["ccdf"].items()), flush=True)
    backend.close()
    labels = list(cases[0]["ccdf"])
    command = " ".join(["python benchmarks/ccdf_on_validation.py", *(argv if argv is not None else sys.argv[1:])])
    lines = [f"Command: `{command}` ({time.perf_counter() - started:.0f} s on this machine's 2 CPU cores). Mean PSNR (dB) on "
             f"{quality.VALIDATION_CROPS} validation crops; DDRM from the forward-diffused estimate at STEPS x "
             f"{SAMPLES} samples (calls per pixel: STEPS x {SAMPLES}) against the full walk's 20 x 4 (80 calls); in "
             "brackets the change over the full walk.", "",
             "| task | dataset | estimate (rms, [-1,1]) | estimate alone | full walk 20 x 4 | "
             + " | ".join(labels) + " |", "|---|---|---|---:|---:|" + "---:|" * len(labels)]
    for case in cases:
        base = np.mean(case["baseline"])
        lines.append(f"| {case['task']} | {case['dataset']} | {case['estimate']} ({case['estimate_rms']:.3f}) "
                     f"| {np.mean(case['classical']):.2f} | {base:.2f} | "
                     + " | ".join(f"{np.mean(case['ccdf'][k]):.2f} ({np.mean(case['ccdf'][k]) - base:+.2f})"
                                  for k in labels) + " |")
    quality.save_results(args.out, "ccdf_on_validation", cases, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
