"""Does bfloat16 autocast train the bundled model's network faster at equal loss, on this CPU?

    python benchmarks/train_precision.py [--steps 150] [--every 25]

Trains the same configuration (``export/train.py``'s defaults) from the same seed twice,
fp32 and bf16 autocast, for the same number of steps, and every ``--every`` steps measures
the loss in fp32 on one fixed validation batch of held-out real EM (fixed crops, timesteps
and noise), so the two runs are compared on the same numbers. Prints a table and writes
benchmarks/results/train_precision.json. ``train.py --bf16`` is used only if bf16 is
faster per step and its validation loss is within ``--tolerance`` (relative) of fp32's.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict, replace
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


def measure(config: TrainConfig, data: Path, steps: int, every: int) -> dict:
    torch.set_num_threads(config.threads)
    sampler = crop_sampler(config, data)
    batch = validation_batch(data, config.crop)
    alphas_bar = torch.from_numpy(np.cumprod(1.0 - Schedule(config.diffusion_steps).betas())).float()
    run = TrainingRun(config)
    curve, seconds = [], 0.0
    while run.step < steps:
        start = time.perf_counter()
        run.train_step(sampler, alphas_bar)
        seconds += time.perf_counter() - start
        if run.step % every == 0:
            curve.append({"step": run.step, "seconds": round(seconds, 1),
                          "validation_loss": round(validation_loss(run.model, batch, alphas_bar), 5)})
            print(f"  {'bf16' if config.bf16 else 'fp32'} step {run.step}: {curve[-1]}", flush=True)
    return {"bf16": config.bf16, "seconds_per_step": round(seconds / steps, 3), "curve": curve}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "em")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--tolerance", type=float, default=0.02)
    args = parser.parse_args()
    config = TrainConfig()
    runs = [measure(replace(config, bf16=bf16), args.data, args.steps, args.every) for bf16 in (False, True)]
    fp32, bf16 = runs
    loss_ratio = bf16["curve"][-1]["validation_loss"] / fp32["curve"][-1]["validation_loss"]
    speedup = fp32["seconds_per_step"] / bf16["seconds_per_step"]
    use_bf16 = speedup > 1.0 and loss_ratio <= 1.0 + args.tolerance
    print("\n| precision | s/step | validation loss at step %d |\n|---|---:|---:|" % args.steps)
    for run in runs:
        print(f"| {'bf16 autocast' if run['bf16'] else 'fp32'} | {run['seconds_per_step']} | "
              f"{run['curve'][-1]['validation_loss']} |")
    print(f"\nbf16: {speedup:.2f}x the speed, validation loss {loss_ratio:.3f}x fp32's -> "
          f"{'use --bf16' if use_bf16 else 'keep fp32'}")
    result = {"command": "python benchmarks/train_precision.py " + f"--steps {args.steps} --every {args.every}",
              "config": asdict(config), "cpu": platform.processor() or platform.machine(),
              "torch": torch.__version__, "runs": runs, "speedup": round(speedup, 2),
              "loss_ratio": round(loss_ratio, 4), "tolerance": args.tolerance, "use_bf16": use_bf16}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train_precision.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
