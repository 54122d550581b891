"""GPU throughput: df5t-512 on a 4096 x 4096 EM montage, ours against two baselines, one run.

    python benchmarks/gpu_throughput.py [--tiles 256 512] [--steps 20] [--size 4096]

Rows (README, "Benchmarks"):
- reference-style: how the published code runs. PyTorch fp32 with PyTorch's default TF32
  settings, one tile per network call, every tile restored by its own DDRM loop with the
  state copied to the host at every step, tiles averaged at the end (16 px overlap).
- PyTorch fp16 batched eager: the fp16 network on batches of tiles, host loop (numpy DDRM,
  tiles copied to and from the GPU at every step).
- ours: the on-device loop (kernels for gather, blend and the fused DDRM step; fp16 network).
Each row reports tile-steps/s, MPix/s, peak GPU memory, the network's share of the time and
its achieved TFLOP/s against the GPU's measured fp16 matrix peak. Writes JSON with the GPU,
driver, clocks, CUDA and package versions. Needs a CUDA GPU and PyTorch.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile

REPO = Path(__file__).resolve().parents[1]
EM_FILE = "micrograph_vemstitch-mussel_tile1_2_2_1768x2048.tif"
GFLOP_PER_256_TILE = 270.0  # REFERENCE.md section 3, df5t-512; scales with pixels
SIGMA0 = 0.2


def montage(data: Path, size: int) -> np.ndarray:
    """A size x size montage tiled (mirrored) from a real EM micrograph."""
    image = tifffile.imread(data / EM_FILE)
    reps = (-(-size // image.shape[0]), -(-size // image.shape[1]))
    return np.pad(image, ((0, reps[0] * image.shape[0] - image.shape[0]), (0, reps[1] * image.shape[1] - image.shape[1])),
                  mode="symmetric")[:size, :size]


def matrix_peak_tflops(torch) -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    return 20 * 2 * 8192**3 / (time.perf_counter() - started) / 1e12


def network_seconds(torch, network, tile: int, batch: int, dtype, calls: int) -> float:
    """The network alone on random tiles, per call (CUDA events, after warm-up)."""
    x = torch.randn(batch, 3, tile, tile, device="cuda", dtype=dtype)
    t = torch.full((batch,), 500.0, device="cuda")
    with torch.inference_mode():
        for _ in range(3):
            network(x, t)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            network(x, t)
        end.record()
        torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / calls


def run_row(torch, name: str, fn, image: np.ndarray, tile: int, tiles_per_step: int, steps: int,
            network_time: float, peak: float) -> dict:
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    started = time.perf_counter()
    fn(image)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    tile_steps = tiles_per_step * steps
    tflop = GFLOP_PER_256_TILE * (tile / 256) ** 2 * tile_steps / 1000
    return {
        "row": name, "tile": tile, "seconds": round(seconds, 2), "tile_steps_per_s": round(tile_steps / seconds, 1),
        "mpix_per_s": round(image.size / 1e6 / seconds, 3),
        "gpu_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "network_share": round(min(1.0, network_time / seconds), 3),
        "tflops": round(tflop / seconds, 1), "tflops_vs_peak": round(tflop / seconds / peak, 3),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "em")
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--tiles", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "throughput_gpu.json")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: this benchmark needs one")
    sys.path.insert(0, str(Path(__file__).parent))
    from df5t_deploy.export.network import DF5TNetwork
    from df5t_deploy.export.onnx_export import eps_only
    from df5t_deploy.export.presets import PRESETS
    from throughput import run_reference  # the same reference-style loop as the CPU benchmark

    from df5t_deploy.api import Restorer
    from df5t_deploy.backends.torch_backend import TorchBackend
    from df5t_deploy.sampler import Timesteps

    image = montage(args.data, args.size)
    peak = matrix_peak_tflops(torch)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        torch.manual_seed(0)
        checkpoint = Path(scratch) / "df5t-512-random.pt"
        torch.save(DF5TNetwork(PRESETS["df5t-512"].network).state_dict(), checkpoint)
        for tile in args.tiles:
            settings = dict(sigma0=SIGMA0, steps=args.steps, seed=0, overlap=tile // 8)
            fp16 = TorchBackend(checkpoint, "cuda", tile=tile, precision="fp16")
            ours = Restorer(checkpoint, backend=fp16, **settings)
            per_step = ours.denoiser.tiles_per_call(1, *image.shape)
            calls = len(Timesteps(PRESETS["df5t-512"].schedule, args.steps))
            net16 = network_seconds(torch, fp16.network, tile, fp16.preferred_batch, torch.float16, 5)
            fp32 = eps_only(DF5TNetwork(PRESETS["df5t-512"].network)).cuda().eval()
            net32 = network_seconds(torch, fp32, tile, 1, torch.float32, 5)
            ref_tiles = len(range(0, args.size - 16, tile - 16)) ** 2
            rows.append(run_row(torch, "reference-style", lambda im, tile=tile: run_reference(im, tile, args.steps, 16, "cuda"),
                                image, tile, ref_tiles, args.steps, net32 * ref_tiles * calls, peak))
            host16 = Restorer(checkpoint, backend=_HostOnly(fp16), **settings)
            rows.append(run_row(torch, "PyTorch fp16 batched eager", host16.restore, image, tile, per_step, args.steps,
                                net16 * per_step / fp16.preferred_batch * calls, peak))
            rows.append(run_row(torch, "ours", ours.restore, image, tile, per_step, args.steps,
                                net16 * per_step / fp16.preferred_batch * calls, peak))
            del fp32
    report = {"benchmark": "throughput_gpu", "size": args.size, "steps": args.steps, "rows": rows,
              "matrix_peak_tflops_fp16": round(peak, 1), "machine": _machine(torch)}
    for row in rows:
        print(f"{row['row']:<28} tile {row['tile']:>4}  {row['seconds']:>8.1f} s  {row['tile_steps_per_s']:>8.1f} tile-steps/s"
              f"  {row['mpix_per_s']:>7.3f} MPix/s  {row['gpu_memory_gb']:>5.1f} GB  net {row['network_share']:.0%}"
              f"  {row['tflops']:>6.1f} TFLOP/s ({row['tflops_vs_peak']:.0%} of peak)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


class _HostOnly:
    """A backend seen without its device loop, so the Restorer runs the host loop."""

    def __init__(self, backend):
        self._backend = backend
        self.name, self.info, self.preferred_batch = backend.name + "-host-loop", backend.info, backend.preferred_batch

    def __call__(self, x, t):
        return self._backend(x, t)


def _machine(torch) -> dict:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem",
                          "--format=csv,noheader"], capture_output=True, text=True)
    import df5t_deploy

    return {"gpu": torch.cuda.get_device_name(), "nvidia_smi": smi.stdout.strip(), "cuda": torch.version.cuda,
            "torch": torch.__version__, "df5t_deploy": df5t_deploy.__version__, "python": sys.version.split()[0]}


if __name__ == "__main__":
    main()
