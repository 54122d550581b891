"""Throughput of a stack restored on a local Dask cluster against the single-process run.

    python benchmarks/cluster.py [--planes 8] [--size 256] [--steps 10]

A stack of real EM planes (held-out mussel tile 3), the bundled model, denoising at sigma0
0.1, written to zarr three ways on the same input in the same run: the single process
(``df5t restore``, all cores to one onnxruntime session), and ``--cluster local:1`` and
``local:2`` (worker processes of one thread each, cores shared out). Reports planes per
second and scaling efficiency (throughput with N workers over N times that with one), and
checks that every output equals the single-process one. The cluster rows include starting
the cluster and loading the model in each worker, as a user's command does. Results go to
benchmarks/results/cluster_cpu.json with the command and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
EM_FILE = "micrograph_vemstitch-mussel_tile3_2_2_1768x2048.tif"


def _restore(folder: Path, steps: int, *extra: str) -> tuple[float, Path]:
    output = folder / f"out{'-'.join(extra).replace(':', '')}.zarr"
    command = [sys.executable, "-c", "from df5t_deploy.cli import entry; entry()", "restore", str(folder / "stack.tif"),
               "-o", str(output), "--sigma0", "0.1", "--steps", str(steps), "--samples", "1", "--walk", "full",
               "--quiet", *extra]
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - started, output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "em")
    parser.add_argument("--planes", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    import tifffile
    import zarr

    tile = tifffile.imread(args.data / EM_FILE)
    stack = np.stack([tile[(150 * i) % (tile.shape[0] - args.size) : (150 * i) % (tile.shape[0] - args.size) + args.size,
                           :args.size] for i in range(args.planes)])
    folder = Path(tempfile.mkdtemp(prefix="df5t-cluster-bench-"))
    try:
        tifffile.imwrite(folder / "stack.tif", stack, photometric="minisblack")
        seconds, reference = _restore(folder, args.steps)
        rows = {"single process": {"seconds": round(seconds, 2)}}
        expected = np.asarray(zarr.open(str(reference))["0"][:])
        for workers in (1, 2):
            seconds, output = _restore(folder, args.steps, "--cluster", f"local:{workers}")
            if not np.array_equal(np.asarray(zarr.open(str(output))["0"][:]), expected):
                raise SystemExit(f"local:{workers}: the output differs from the single-process one")
            rows[f"--cluster local:{workers}"] = {"seconds": round(seconds, 2)}
    finally:
        shutil.rmtree(folder)
    for row in rows.values():
        row["planes_per_s"] = round(args.planes / row["seconds"], 4)
    one = rows["--cluster local:1"]["planes_per_s"]
    rows["--cluster local:2"]["scaling_efficiency"] = round(rows["--cluster local:2"]["planes_per_s"] / (2 * one), 3)
    record = {"command": "python " + " ".join([os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]]),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
              "stack": [args.planes, args.size, args.size], "steps": args.steps, "rows": rows,
              "identical_to_single_process": True}
    print(f"{'':22s} {'seconds':>8s} {'planes/s':>9s} {'efficiency':>10s}")
    for name, row in rows.items():
        efficiency = row.get("scaling_efficiency")
        print(f"{name:22s} {row['seconds']:8.1f} {row['planes_per_s']:9.3f} "
              f"{'' if efficiency is None else f'{efficiency:10.2f}'}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cluster_cpu.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out / 'cluster_cpu.json'}")


if __name__ == "__main__":
    main()
