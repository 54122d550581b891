"""A training state small enough to travel to and from a GPU machine that takes 64 MiB.

    python training/travel.py pack RUN DEST [--data SHARED_EM]   # RUN/state.pt -> DEST/state.part*
    python training/travel.py unpack SRC RUN                     # SRC/state.part* -> RUN/state.pt

The whole state of df5t-small-em is 69 MB (weights, EMA weights and AdamW's two moments, all
fp32). Packed: the weights exactly (fp32), the EMA weights as a bf16 difference from them
(their gap is small, so its rounding is far below the weights' own), AdamW's second moment in
bf16, and its first moment left out (with beta1 = 0.9 it is rebuilt within a few tens of
steps); 35 MB, written in parts of at most 15 MiB (the machine returns files of up to 16
MiB). ``--data`` adds the training files, the FlyEM volume cut to its training planes. Every
other field (settings, random generators, step, time, loss curve) travels as it is.
A resumed packed state continues the same run, approximately: it is not the bit-exact resume
of ``state.pt``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
from pathlib import Path

import tifffile
import torch

from df5t_deploy.export.train_data import FLYEM_TRAIN_PLANES, FLYEM_VOLUME, MUSSEL_TRAIN
from df5t_deploy.files import atomic_path

PART_BYTES = 15 * 2**20
PARTS_INDEX = "state.parts.json"


def pack(state: dict) -> dict:
    model, ema, optimizer = state["model"], state["ema"], state["optimizer"]
    names = state["param_names"]
    return {
        **{key: value for key, value in state.items() if key not in ("model", "ema", "optimizer")},
        "model": model,
        "ema_minus_model": {name: (ema[name].float() - model[name].float()).to(torch.bfloat16) for name in model},
        "exp_avg_sq": {names[i]: entry["exp_avg_sq"].to(torch.bfloat16) for i, entry in optimizer["state"].items()},
        "adam_steps": {names[i]: entry["step"] for i, entry in optimizer["state"].items()},
        "optimizer_groups": optimizer["param_groups"],
    }


def unpack(packed: dict) -> dict:
    model, names = packed["model"], packed["param_names"]
    ema = {name: (model[name].float() + packed["ema_minus_model"][name].float()).to(model[name].dtype) for name in model}
    optimizer_state = {
        i: {"step": packed["adam_steps"][name], "exp_avg": torch.zeros_like(model[name]),
            "exp_avg_sq": packed["exp_avg_sq"][name].float()}
        for i, name in enumerate(names) if name in packed["exp_avg_sq"]
    }
    rest = {key: value for key, value in packed.items()
            if key not in ("ema_minus_model", "exp_avg_sq", "adam_steps", "optimizer_groups")}
    return {**rest, "ema": ema, "optimizer": {"state": optimizer_state, "param_groups": packed["optimizer_groups"]}}


def write_parts(packed: dict, folder: Path) -> list[Path]:
    buffer = io.BytesIO()
    torch.save(packed, buffer)
    data = buffer.getvalue()
    folder.mkdir(parents=True, exist_ok=True)
    parts = []
    for index, start in enumerate(range(0, len(data), PART_BYTES)):
        part = folder / f"state.part{index:02d}"
        with atomic_path(part) as tmp:
            tmp.write_bytes(data[start : start + PART_BYTES])
        parts.append(part)
    index = {"parts": [p.name for p in parts], "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    with atomic_path(folder / PARTS_INDEX) as tmp:
        tmp.write_text(json.dumps(index, indent=1) + "\n")
    return parts


def read_parts(folder: Path) -> dict:
    index = json.loads((folder / PARTS_INDEX).read_text())
    data = b"".join((folder / name).read_bytes() for name in index["parts"])
    if len(data) != index["bytes"] or hashlib.sha256(data).hexdigest() != index["sha256"]:
        raise SystemExit(f"{folder}: the parts do not make the packed state they were cut from (missing or damaged)")
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def write_training_data(shared_em: Path, folder: Path) -> None:
    """The training files alone: the FlyEM volume cut to its training planes, the mussel tile."""
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / FLYEM_VOLUME) as tmp:
        tifffile.imwrite(tmp, tifffile.imread(shared_em / FLYEM_VOLUME)[FLYEM_TRAIN_PLANES])
    with atomic_path(folder / MUSSEL_TRAIN) as tmp:
        tmp.write_bytes((shared_em / MUSSEL_TRAIN).read_bytes())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="verb", required=True)
    packing = verbs.add_parser("pack", help="RUN/state.pt -> DEST/state.part*")
    packing.add_argument("run", type=Path)
    packing.add_argument("dest", type=Path)
    packing.add_argument("--data", type=Path, help="shared/data/em: also write the training files to DEST/data")
    unpacking = verbs.add_parser("unpack", help="SRC/state.part* -> RUN/state.pt")
    unpacking.add_argument("src", type=Path)
    unpacking.add_argument("run", type=Path)
    args = parser.parse_args(argv)
    if args.verb == "pack":
        state = torch.load(args.run / "state.pt", map_location="cpu", weights_only=True)
        parts = write_parts(pack(state), args.dest)
        if args.data:
            write_training_data(args.data, args.dest / "data")
        print(f"packed step {state['step']} into {len(parts)} parts in {args.dest}")
    else:
        target = args.run / "state.pt"
        if target.exists():
            raise SystemExit(f"{target} exists: unpack into another run folder (nothing is written over)")
        state = unpack(read_parts(args.src))
        args.run.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            torch.save(state, tmp)
        print(f"unpacked step {state['step']} into {target}")


if __name__ == "__main__":
    main()
