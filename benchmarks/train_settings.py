"""Does a training setting train the bundled model's network faster at equal loss, on this CPU?

    python benchmarks/train_settings.py --compare bf16 [--steps 150] [--every 25]
    python benchmarks/train_settings.py --compare compile [--steps 50] [--every 25]

``bf16``: fp32 against bfloat16 autocast. ``compile``: bf16 autocast eager against the same
with the step's network compiled by ``torch.compile``. Trains the same configuration
(``export/train.py``'s defaults) from the same seed twice, baseline and candidate, for the
same number of steps, and every ``--every`` steps measures the loss in fp32 on one fixed
validation batch of held-out real EM (fixed crops, timesteps and noise), so the two runs are
compared on the same numbers. The first step (which compiles) is timed on its own and left out
of the seconds per step. Prints a table and writes benchmarks/results/train_SETTING.json. The
setting is used (``train.py --bf16``, ``--compile``) only if it is faster per step and its
validation loss is within ``--tolerance`` (relative) of the baseline's.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from df5t_deploy.export.train import TrainConfig, TrainingRun, crop_sampler
from df5t_deploy.export.train_data import (
    FLYEM_HELDOUT_PLANES,
    FLYEM_VOLUME,
    MUSSEL_HELDOUT,
    CropSampler,
    to_model_scale,
)

from df5t_deploy.artifact import Schedule

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def validation_batch(data: Path, crop: int, size: int = 32) -> tuple[torch.Tensor, ...]:
    """Fixed held-out crops, timesteps spread over [0, T) and noise: the same for every run."""
    import tifffile

    volume = to_model_scale(tifffile.imread(data / FLYEM_VOLUME)[FLYEM_HELDOUT_PLANES])
    tile = to_model_scale(tifffile.imread(data / MUSSEL_HELDOUT))
    rng = np.random.default_rng(1234)
    x0 = torch.from_numpy(CropSampler(volume, tile, crop).batch(rng, size)).expand(-1, 3, -1, -1)
    t = torch.linspace(0, 999, size).round()
    noise = torch.from_numpy(rng.standard_normal((size, 3, crop, crop)).astype(np.float32))
    return x0, t, noise


@torch.no_grad()
def validation_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, ...], alphas_bar: torch.Tensor) -> float:
    x0, t, noise = batch
    a = alphas_bar[t.long()][:, None, None, None]
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
    model.eval()
    loss = torch.nn.functional.mse_loss(model(xt, t)[:, :3], noise).item()
    model.train()
    return loss


#: What each setting's comparison trains: (baseline, candidate).
COMPARISONS = {
    "bf16": (TrainConfig(), TrainConfig(bf16=True)),
    "compile": (TrainConfig(bf16=True), TrainConfig(bf16=True, compile=True)),
}


def label(config: TrainConfig) -> str:
    return ("bf16 autocast" if config.bf16 else "fp32") + (", compiled" if config.compile else "")


def measure(config: TrainConfig, data: Path, steps: int, every: int) -> dict:
    torch.set_num_threads(config.threads)
    sampler = crop_sampler(config, data)
    batch = validation_batch(data, config.crop)
    alphas_bar = torch.from_numpy(np.cumprod(1.0 - Schedule(config.diffusion_steps).betas())).float()
    run = TrainingRun(config)
    curve, seconds, first_step = [], 0.0, None
    while run.step < steps:
        start = time.perf_counter()
        run.train_step(sampler, alphas_bar)
        elapsed = time.perf_counter() - start
        if first_step is None:
            first_step = elapsed
        else:
            seconds += elapsed
        if run.step % every == 0:
            curve.append({"step": run.step, "seconds": round(first_step + seconds, 1),
                          "validation_loss": round(validation_loss(run.model, batch, alphas_bar), 5)})
            print(f"  {label(config)} step {run.step}: {curve[-1]}", flush=True)
    return {"label": label(config), "bf16": config.bf16, "compile": config.compile,
            "first_step_seconds": round(first_step, 2),
            "seconds_per_step": round(seconds / (steps - 1), 3), "curve": curve}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare", choices=sorted(COMPARISONS), required=True)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "em")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--tolerance", type=float, default=0.02)
    args = parser.parse_args()
    runs = [measure(config, args.data, args.steps, args.every) for config in COMPARISONS[args.compare]]
    baseline, candidate = runs
    loss_ratio = candidate["curve"][-1]["validation_loss"] / baseline["curve"][-1]["validation_loss"]
    speedup = baseline["seconds_per_step"] / candidate["seconds_per_step"]
    use = speedup > 1.0 and loss_ratio <= 1.0 + args.tolerance
    print("\n| training | first step (s) | s/step after it | validation loss at step %d |\n|---|---:|---:|---:|"
          % args.steps)
    for run in runs:
        print(f"| {run['label']} | {run['first_step_seconds']} | {run['seconds_per_step']} | "
              f"{run['curve'][-1]['validation_loss']} |")
    print(f"\n{candidate['label']}: {speedup:.2f}x the speed of {baseline['label']}, validation loss "
          f"{loss_ratio:.3f}x its -> {'use' if use else 'do not use'} --{args.compare}")
    result = {"command": f"python benchmarks/train_settings.py --compare {args.compare} "
                         f"--steps {args.steps} --every {args.every}",
              "config": asdict(COMPARISONS[args.compare][1]), "cpu": platform.processor() or platform.machine(),
              "torch": torch.__version__, "runs": runs, "speedup": round(speedup, 2),
              "loss_ratio": round(loss_ratio, 4), "tolerance": args.tolerance, "use": use}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"train_{args.compare}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
