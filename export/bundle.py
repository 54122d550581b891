"""Turn a finished training run into the bundled model: checkpoint, ONNX artifact, model card.

    python -m df5t_deploy.export.bundle runs/df5t-small-em [--name df5t-small-em] [--quality QUALITY.md]
        [--notes NOTES.md]

reads ``ema.pt`` and ``training.json`` from the run folder (see ``train``), exports the
artifact at the training crop size, and writes ``NAME.{pt,onnx,md}`` and the loss curve
``NAME-loss.png`` into ``df5t_deploy/models`` (the default name is the bundled model's,
``models.DEFAULT_MODEL``). ``--quality`` puts the quality benchmark's table for this model
(``benchmarks/quality.py --model ...`` writes it) into the model card, ``--notes`` what the
run's facts do not tell (how it was stopped and resumed, what shared its machine).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from .. import models
from ..artifact import Schedule
from ..files import atomic_path, sha256_of
from ..models import DEFAULT_MODEL
from .checkpoint import load_checkpoint
from .onnx_export import export_checkpoint

MODELS_DIR = Path(models.__file__).parent
#: What a bundled model may add to the package: its fp32 ONNX artifact (what every backend but
#: PyTorch's runs) and its checkpoint in fp16 (what the PyTorch backend runs, in fp16). The
#: smallest network of the published architecture that beats the tiny one (C=32, 4.3 M
#: parameters) is 17.3 MB as the artifact and 8.7 MB as the fp16 checkpoint.
SIZE_LIMIT_BYTES = 30 * 2**20


def bundle(run: Path, models_dir: Path = MODELS_DIR, name: str = DEFAULT_MODEL, quality: Path | None = None,
           notes: Path | None = None) -> Path:
    facts = json.loads((run / "training.json").read_text())
    quality_table = _without_title(quality.read_text()) if quality is not None else None
    run_notes = notes.read_text().strip() if notes is not None else None
    checkpoint = models_dir / f"{name}.pt"
    artifact = models_dir / f"{name}.onnx"
    with atomic_path(checkpoint) as tmp:
        save_in_fp16(run / "ema.pt", tmp)
    loaded = load_checkpoint(checkpoint)
    report = export_checkpoint(loaded, artifact, tile=facts["config"]["crop"],
                               schedule=Schedule(**facts["schedule"]))
    size = checkpoint.stat().st_size + artifact.stat().st_size
    if size > SIZE_LIMIT_BYTES:
        raise SystemExit(f"bundled model is {size / 2**20:.1f} MB, over the {SIZE_LIMIT_BYTES / 2**20:.0f} MB limit")
    curve = models_dir / f"{name}-loss.png"
    with atomic_path(curve) as tmp:
        loss_figure(facts.get("loss_curve", []), tmp)
    card = models_dir / f"{name}.md"
    with atomic_path(card) as tmp:
        tmp.write_text(model_card(name, facts, report.relative_error, sha256_of(checkpoint), sha256_of(artifact),
                                  curve.name, quality_table, run_notes))
    print(f"bundled {name}: {checkpoint.name} + {artifact.name} ({size / 2**20:.1f} MB), card {card.name}")
    return artifact


def save_in_fp16(weights: Path, path: Path) -> None:
    """The state dict ``weights`` with its floating tensors stored in fp16: half the size, and
    what the PyTorch backend runs anyway. The artifact is exported from these same rounded
    weights, so the two files hold one model (the artifact records this file's sha256).
    Saved through a file object: given a path, torch.save names the archive's records after
    it, and ``path`` is a random temporary name, so the same weights would hash differently."""
    import torch

    state = torch.load(weights, map_location="cpu", weights_only=True)
    with open(path, "wb") as file:
        torch.save({key: value.half() if value.is_floating_point() else value for key, value in state.items()}, file)


def _without_title(markdown: str) -> str:
    """A markdown document's body: its first line dropped when it is a title (the card has one)."""
    lines = markdown.strip().splitlines()
    return "\n".join(lines[1:] if lines and lines[0].startswith("# ") else lines).strip()


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


def learning_rate_schedule(config: dict) -> str:
    """The warm-up and cooldown of ``config``'s learning rate, in words (states trained
    before the cooldown existed have no such setting: their rate stayed constant)."""
    words = f"{config['warmup_steps']} warm-up steps"
    cooldown = config.get("cooldown_steps", 0)
    if cooldown:
        words += f", then linear decay to 0 over the last {cooldown:,} of {config['max_steps']:,} steps"
    return words


def loss_figure(curve: list, path: Path, size: tuple[int, int] = (480, 240)) -> None:
    """The loss curve (EMA of the batch MSE against steps) as a PNG, with its axes' ranges."""
    from PIL import Image, ImageDraw

    image = Image.new("L", size, 255)
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = 56, 12, size[0] - 12, size[1] - 28
    draw.rectangle((left, top, right, bottom), outline=0)
    if len(curve) < 2:
        draw.text((left + 8, top + 8), "no loss curve recorded", fill=0)
    else:
        steps, losses = (np.array(column, dtype=float) for column in zip(*curve))
        low, high = float(losses.min()), float(losses.max())
        span_y, span_x = max(high - low, 1e-12), max(steps[-1] - steps[0], 1.0)
        points = [(left + (step - steps[0]) / span_x * (right - left), bottom - (loss - low) / span_y * (bottom - top))
                  for step, loss in zip(steps, losses)]
        draw.line(points, fill=0, width=2)
        draw.text((4, top), f"{high:.4f}", fill=0)
        draw.text((4, bottom - 10), f"{low:.4f}", fill=0)
        draw.text((left, bottom + 6), f"step {int(steps[0]):,}", fill=0)
        draw.text((right - 90, bottom + 6), f"step {int(steps[-1]):,}", fill=0)
    image.save(path, format="PNG")


def augmentation(config: dict) -> str:
    """The crops' augmentations, as ``CropSampler`` draws them for ``config``."""
    parts = ["turned by flips and 90-degree rotations"]
    if config["max_scale"] > 1:
        parts.insert(0, f"at pixel sizes 1 to {config['max_scale']} times the data's (block means)")
    if config["contrast_jitter"] or config["brightness_jitter"]:
        parts.append(f"contrast jittered by up to {config['contrast_jitter']:g} (relative) and brightness by up to "
                     f"{config['brightness_jitter']:g} (on [-1, 1])")
    return ", ".join(parts)


def model_card(name: str, facts: dict, export_error: float, ckpt_sha: str, onnx_sha: str, curve_file: str,
               quality_table: str | None = None, notes: str | None = None) -> str:
    cfg = facts["config"]
    curve = facts.get("loss_curve", [])
    curve_text = "No loss curve was recorded."
    if len(curve) >= 2:
        every, first = curve[1][0] - curve[0][0], curve[0][0]
        curve_text = (f"Loss (EMA of the batch MSE) every {every} steps, from step {first:,} to {curve[-1][0]:,}"
                      + (f" (the training kept no curve before step {first:,})" if first > every else "") + ":")
    history = f"\n\n{notes}\n" if notes else ""
    quality = quality_table or "Not measured for this model yet: `python benchmarks/quality.py --model MODEL.onnx`."
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
  T = {facts['schedule']['num_diffusion_timesteps']}; AdamW lr {cfg['lr']} ({learning_rate_schedule(cfg)}),
  batch {cfg['batch']}, EMA {cfg['ema_decay']}, gradient clipping 1.0, seed {cfg['seed']}.
- Data: random {cfg['crop']} x {cfg['crop']} crops {augmentation(cfg)}; grey replicated to
  three channels, intensities v/255 mapped to [-1, 1]; half the crops from each source:
{data}
- Held out (never seen in training):
{held_out}
- Steps: {facts['steps']:,} ({facts['samples_seen']:,} crops), wall time {facts['wall_time_minutes']} min
  on 2 CPU cores ({facts['torch']}), final loss (EMA of the batch MSE) {facts['final_loss_ema']}.{history}
- Reproduce: `python -m df5t_deploy.export.train --data ../shared/data/em --out runs/{name}
  {training_flags(cfg)}` then `python -m df5t_deploy.export.bundle runs/{name}`
  (the step count reached in a time budget depends on the machine).

## Loss curve
{curve_text}

![Training loss of {name}]({curve_file})

## Quality on held-out real EM
{quality}

## Files
- `{name}.pt`: the EMA weights in fp16, a plain state dict (sha256 `{ckpt_sha}`).
- `{name}.onnx`: its fp32 artifact at tile {cfg['crop']} (sha256 `{onnx_sha}`); onnxruntime
  reproduces PyTorch to a relative error below {_decade_above(export_error):.0e} (on fresh random inputs).

## Licence
The weights are released under CC BY 4.0. They were trained on the FlyEM FIB-SEM data
(Creative Commons Attribution; credit: Janelia FlyEM / HHMI Janelia Research Campus,
janelia-flyem/neuroproof_examples) and on a vEMstitch mussel tile (CC0 1.0,
HeracleBT/vEMstitch).
"""


def _decade_above(error: float) -> float:
    """The power of ten just above a verification error: each export draws fresh random
    inputs, so the error's digits change from one bundling to the next, its decade does not."""
    return 10.0 ** math.ceil(math.log10(max(error, 1e-12)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="training run folder with ema.pt and training.json")
    parser.add_argument("--name", default=DEFAULT_MODEL, help=f"the bundled model's name (default {DEFAULT_MODEL})")
    parser.add_argument("--quality", type=Path, default=None,
                        help="the quality benchmark's table for this model (results/quality.md), for the card")
    parser.add_argument("--notes", type=Path, default=None,
                        help="a Markdown paragraph for the card's training section: what the facts do not tell")
    args = parser.parse_args(argv)
    bundle(args.run, name=args.name, quality=args.quality, notes=args.notes)


if __name__ == "__main__":
    main()
