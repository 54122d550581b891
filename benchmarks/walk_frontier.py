"""The denoising walk's defaults, chosen on the quality benchmark's validation crops (never its
test crops): PSNR against network calls per pixel, and the speed of the result, whole process.

    python benchmarks/walk_frontier.py                      # the frontier and the timings
    python benchmarks/walk_frontier.py --steps 1 2 --samples 4 8 --eta 0.5 --skip-timing

Frontier: for Gaussian (sigma0 0.2) and Poisson-Gaussian noise on each dataset, the
``VALIDATION_CROPS`` crops are restored, seeds as the benchmark's, by the matched walk
(``--walk matched``) at every steps x samples x eta asked, and by today's quality row, the
full walk at 20 steps x 4 samples (80 calls per pixel) with the task's default eta. Reported:
mean PSNR per case, its change over today's row, the worst case's change, and for each budget
of calls the best setting (the frontier).

Timing: ``df5t restore`` as a user runs it (a new process each, the bundled model, this
machine's CPU) on the bundled sample with known Gaussian noise added (its PSNR against the
sample) and on the sample as it is (--sigma0 auto, the demo): the Restorer's defaults against
the full walk at 20 x 4 and at the CLI's previous default, 50 x 1, each run twice, the faster
kept.
"""

from __future__ import annotations

import argparse
import itertools
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import quality
import tifffile

from df5t_deploy.backends import open_backend
from df5t_deploy.degrade import degrade
from df5t_deploy.models import default_model_path
from df5t_deploy.samples import sample_path
from df5t_deploy.settings import DEFAULT_FINAL_STEP, default_samples, default_steps
from df5t_deploy.tasks import TaskOptions

TASKS = ("denoise", "denoise, Poisson-Gaussian")
BASELINE = (20, 4, DEFAULT_FINAL_STEP)  # today's quality row, full walk
#: The whole-process runs of the timing: label -> df5t restore options.
RUNS = {
    "defaults": [],
    "full walk, 20 x 4": ["--walk", "full", "--steps", "20", "--samples", "4"],
    "full walk, 50 x 1 (previous CLI default)": ["--walk", "full", "--steps", "50", "--samples", "1"],
}
TIMING_SIGMA0 = 0.2


def validation_psnr(task, dataset, backend, model: Path, row: tuple, **overrides) -> list[float]:
    seed = quality.case_seed(task, dataset)
    crops = quality.pairs(task, dataset, "validation", quality.VALIDATION_CROPS, seed)
    return [quality.psnr_ssim(quality.ddrm_restore(task, measured, info, row, model, seed + i, backend=backend,
                                                   **overrides), truth)[0]
            for i, (truth, measured, info) in enumerate(crops)]


def frontier(args, log) -> dict:
    backend = open_backend("auto", args.model)
    cases = []
    for task in (t for t in quality.tasks() if t.name in TASKS):
        for dataset in (d for d in quality.datasets(args.data) if d.name in task.datasets):
            case = {"task": task.name, "dataset": dataset.name,
                    "baseline": validation_psnr(task, dataset, backend, args.model, BASELINE, walk="full"),
                    "matched": {}}
            for steps, samples, eta in itertools.product(args.steps, args.samples, args.eta):
                case["matched"][f"{steps}x{samples}@{eta}"] = validation_psnr(
                    task, dataset, backend, args.model, (steps, samples, DEFAULT_FINAL_STEP), walk="matched", eta=eta)
            cases.append(case)
            log(f"{task.name}, {dataset.name}: today's 20 x 4 {np.mean(case['baseline']):.2f} dB; best matched "
                + max(((k, np.mean(v)) for k, v in case["matched"].items()), key=lambda kv: kv[1]).__repr__())
    backend.close()
    return {"cases": cases}


def _setting(key: str) -> tuple[int, int, float]:
    shape, eta = key.split("@")
    steps, samples = shape.split("x")
    return int(steps), int(samples), float(eta)


def frontier_table(results: dict) -> str:
    cases = results["cases"]
    names = [f"{c['task'].replace('denoise, ', '')}, {c['dataset']}" for c in cases]
    lines = ["| walk | steps x samples | eta | calls | " + " | ".join(names) + " | mean change | worst change |",
             "|---|---|---:|---:|" + "---:|" * (len(names) + 2)]
    base = [np.mean(c["baseline"]) for c in cases]
    lines.append("| full (today's quality row) | 20 x 4 | task default | 80 | "
                 + " | ".join(f"{b:.2f}" for b in base) + " | | |")
    rows = []
    for key in cases[0]["matched"]:
        steps, samples, eta = _setting(key)
        psnr = [np.mean(c["matched"][key]) for c in cases]
        change = np.array(psnr) - base
        rows.append((steps * samples, change.mean(), key, psnr, change))
    for calls, mean_change, key, psnr, change in sorted(rows):
        steps, samples, eta = _setting(key)
        lines.append(f"| matched | {steps} x {samples} | {eta:g} | {calls} | "
                     + " | ".join(f"{p:.2f} ({d:+.2f})" for p, d in zip(psnr, change))
                     + f" | {mean_change:+.2f} | {change.min():+.2f} |")
    lines += ["", "Frontier: the best setting by mean change for each budget of calls per pixel (and fewer).", "",
              "| calls at most | setting | mean change | worst change |", "|---:|---|---:|---:|"]
    for budget in sorted({r[0] for r in rows}):
        calls, mean_change, key, _, change = max((r for r in rows if r[0] <= budget), key=lambda r: r[1])
        steps, samples, eta = _setting(key)
        lines.append(f"| {budget} | {steps} x {samples}, eta {eta:g} | {mean_change:+.2f} | {change.min():+.2f} |")
    return "\n".join(lines)


def _restore_seconds(source: Path, out: Path, options: list[str], model: Path) -> float:
    """The faster of two runs; ``out`` holds the last one's result."""
    best = np.inf
    for _ in range(2):
        out.unlink(missing_ok=True)
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "df5t_deploy.cli", "restore", str(source), "-o", str(out), "--model",
                        str(model), "--quiet", *options], check=True)
        best = min(best, time.perf_counter() - started)
    return best


def timing(model: Path) -> dict:
    sample = sample_path()
    truth = tifffile.imread(sample)
    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        noisy = Path(folder) / "noisy.tif"
        tifffile.imwrite(noisy, degrade(truth, TaskOptions("denoise"), sigma0=TIMING_SIGMA0, seed=1).image)
        for label, options in RUNS.items():
            out = Path(folder) / "out.tif"
            seconds = _restore_seconds(noisy, out, ["--sigma0", str(TIMING_SIGMA0), *options], model)
            psnr = quality.psnr_ssim(tifffile.imread(out), truth)[0]
            demo = _restore_seconds(sample, Path(folder) / "demo.tif", ["--sigma0", "auto", *options], model)
            rows[label] = {"noisy_seconds": round(seconds, 2), "psnr": round(psnr, 2), "demo_seconds": round(demo, 2)}
    return rows


def timing_table(rows: dict) -> str:
    base = rows["full walk, 20 x 4"]
    lines = [f"| df5t restore | known noise (sigma0 {TIMING_SIGMA0}): s | PSNR vs the sample (dB) | demo (--sigma0 auto): s "
             "| speed-up over full 20 x 4 (known noise, demo) |", "|---|---:|---:|---:|---|"]
    for label, r in rows.items():
        lines.append(f"| {label} | {r['noisy_seconds']:.1f} | {r['psnr']:.2f} | {r['demo_seconds']:.1f} "
                     f"| {base['noisy_seconds'] / r['noisy_seconds']:.1f}x, {base['demo_seconds'] / r['demo_seconds']:.1f}x |")
    return "\n".join(lines)


def frontier_header(command: str, model: Path, seconds: float) -> str:
    return (f"Command: `{command}` ({seconds:.0f} s on this machine's 2 CPU cores). Model: {model.name}. Mean PSNR "
            f"(dB) on {quality.VALIDATION_CROPS} validation crops per case (the quality benchmark's, never its test "
            "crops); in brackets the change over today's quality row, the full walk at 20 x 4.")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=quality.REPO.parent / "shared" / "data" / "em")
    parser.add_argument("--model", type=Path, default=default_model_path())
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 3, 5])
    parser.add_argument("--samples", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--eta", type=float, nargs="+", default=[0.5, 0.85, 1.0])
    part = parser.add_mutually_exclusive_group()
    part.add_argument("--skip-timing", action="store_true", help="only the frontier (walk_frontier.*)")
    part.add_argument("--skip-frontier", action="store_true", help="only the timing (walk_timing.*)")
    parser.add_argument("--out", type=Path, default=quality.RESULTS / "walk-frontier")
    args = parser.parse_args(argv)
    command = " ".join(["python benchmarks/walk_frontier.py", *(argv if argv is not None else sys.argv[1:])])
    if not args.skip_frontier:
        started = time.perf_counter()
        results = frontier(args, lambda line: print(line, flush=True))
        text = frontier_header(command, args.model, time.perf_counter() - started) + "\n\n" + frontier_table(results)
        quality.save_results(args.out, "walk_frontier", results, text)
        print(text)
    if not args.skip_timing:
        rows = timing(args.model)
        text = (f"Command: `{command}`. Whole process, `df5t restore` on the bundled 256 x 256 sample, each the "
                f"faster of two runs; the defaults are {default_steps('denoise')} steps x "
                f"{default_samples('denoise')} samples of the matched walk.\n\n" + timing_table(rows))
        quality.save_results(args.out, "walk_timing", rows, text)
        print(text)


if __name__ == "__main__":
    main()
