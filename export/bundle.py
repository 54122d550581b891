"""Turn a finished training run into the bundled model: checkpoint, ONNX artifact, model card.

    python -m df5t_deploy.export.bundle runs/df5t-tiny-em [--name df5t-tiny-em]

reads ``ema.pt`` and ``training.json`` from the run folder (see ``train``), exports the
artifact at the training crop size, and writes ``NAME.{pt,onnx,md}`` into
``df5t_deploy/models`` (the default name is the bundled model's, ``models.DEFAULT_MODEL``).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from .. import models
from ..artifact import Schedule
from ..files import atomic_path, sha256_of
from ..models import DEFAULT_MODEL
from .checkpoint import load_checkpoint
from .onnx_export import export_checkpoint

MODELS_DIR = Path(models.__file__).parent
SIZE_LIMIT_BYTES = 20 * 2**20


def bundle(run: Path, models_dir: Path = MODELS_DIR, name: str = DEFAULT_MODEL) -> Path:
    facts = json.loads((run / "training.json").read_text())
    checkpoint = models_dir / f"{name}.pt"
    artifact = models_dir / f"{name}.onnx"
    with atomic_path(checkpoint) as tmp:
        shutil.copyfile(run / "ema.pt", tmp)
    loaded = load_checkpoint(checkpoint)
    report = export_checkpoint(loaded, artifact, tile=facts["config"]["crop"],
                               schedule=Schedule(**facts["schedule"]))
    size = checkpoint.stat().st_size + artifact.stat().st_size
    if size > SIZE_LIMIT_BYTES:
        raise SystemExit(f"bundled model is {size / 2**20:.1f} MB, over the 20 MB limit")
    card = models_dir / f"{name}.md"
    with atomic_path(card) as tmp:
        tmp.write_text(model_card(name, facts, report.relative_error, sha256_of(checkpoint), sha256_of(artifact)))
    print(f"bundled {name}: {checkpoint.name} + {artifact.name} ({size / 2**20:.1f} MB), card {card.name}")
    return artifact


def training_flags(config: dict) -> str:
    """The ``train`` options that give ``config``: every setting (the defaults change as
    models do), in the order TrainConfig declares them."""
    flags = []
    for key, value in config.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        else:
            flags.append(f"{flag} {value:g}" if isinstance(value, float) else f"{flag} {value}")
    return " ".join(flags)


def model_card(name: str, facts: dict, export_error: float, ckpt_sha: str, onnx_sha: str) -> str:
    cfg = facts["config"]
    data = "\n".join(f"  - `{file}`: {what}" for file, what in facts["training_data"].items())
    held_out = "\n".join(f"  - `{file}`: {what}" for file, what in facts["held_out"].items())
    return f"""# {name}

A small DF5T network (the published architecture at C={cfg['num_channels']}, N={cfg['num_res_blocks']},
h0={cfg['num_heads']}, three output channels; {facts['parameters']:,} parameters) trained from scratch
on real EM on 2 CPU cores, so that df5t-deploy restores real data out of the box. It is a
demonstration-grade prior, far smaller and far less trained than the published DF5T; see the
quality benchmark (`benchmarks/results/quality.md`) for what it does and does not achieve.

## Training
- Objective: DDPM noise prediction, linear betas {facts['schedule']['beta_start']}..{facts['schedule']['beta_end']},
  T = {facts['schedule']['num_diffusion_timesteps']}; AdamW lr {cfg['lr']} ({cfg['warmup_steps']} warm-up steps),
  batch {cfg['batch']}, EMA {cfg['ema_decay']}, gradient clipping 1.0, seed {cfg['seed']}.
- Data: random {cfg['crop']} x {cfg['crop']} crops with flips and 90-degree rotations, grey replicated to
  three channels, intensities v/255 mapped to [-1, 1]; half the crops from each source:
{data}
- Held out (never seen in training):
{held_out}
- Steps: {facts['steps']:,} ({facts['samples_seen']:,} crops), wall time {facts['wall_time_minutes']} min
  on 2 CPU cores ({facts['torch']}), final loss (EMA of the batch MSE) {facts['final_loss_ema']}.
- Reproduce: `python -m df5t_deploy.export.train --data ../shared/data/em --out runs/{name}
  {training_flags(cfg)}` then `python -m df5t_deploy.export.bundle runs/{name}`
  (the step count reached in a time budget depends on the machine).

## Files
- `{name}.pt`: the EMA weights, a plain state dict (sha256 `{ckpt_sha}`).
- `{name}.onnx`: its fp32 artifact at tile {cfg['crop']} (sha256 `{onnx_sha}`); onnxruntime
  reproduces PyTorch to a relative error of {export_error:.1e}.

## Licence
The weights are released under CC BY 4.0. They were trained on the FlyEM FIB-SEM data
(Creative Commons Attribution; credit: Janelia FlyEM / HHMI Janelia Research Campus,
janelia-flyem/neuroproof_examples) and on a vEMstitch mussel tile (CC0 1.0,
HeracleBT/vEMstitch).
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="training run folder with ema.pt and training.json")
    parser.add_argument("--name", default=DEFAULT_MODEL, help=f"the bundled model's name (default {DEFAULT_MODEL})")
    args = parser.parse_args(argv)
    bundle(args.run, name=args.name)


if __name__ == "__main__":
    main()
