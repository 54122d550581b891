"""GPU throughput: df5t-512 on a 4096 x 4096 EM montage, ours against two baselines, one run.

    python benchmarks/gpu_throughput.py [--tiles 256 512] [--steps 20] [--size 4096] [--compile]

Rows (README, "Benchmarks"):
- reference-style: how the published code runs. PyTorch fp32 with PyTorch's default TF32
  settings, one tile per network call, every tile restored by its own DDRM loop with the
  state copied to the host at every step, tiles averaged at the end (16 px overlap).
- PyTorch fp16 batched eager: the fp16 network on batches of tiles, host loop (numpy DDRM,
  tiles copied to and from the GPU at every step).
- ours: the on-device loop (kernels for gather, blend and the fused DDRM step; fp16 network
  in PyTorch; one step captured as a CUDA graph).
- operator kernels alone: the on-device loop with a network that only zeroes eps, i.e.
  what the kernels (gather, blend, DDRM step) and graph launches cost by themselves.
- ours + torch.compile (with --compile): the same with the network compiled by Inductor.
- ours, TensorRT (when TensorRT is installed): the same loop with an fp16 engine built from
  the fp16 ONNX export (cached under the usual engine cache).
Each row reports tile-steps/s, MPix/s, peak GPU memory (PyTorch's allocator; TensorRT's own
allocations are not in it), the network's share of the time and its achieved TFLOP/s against
the GPU's measured fp16 matrix peak; then ours against the baselines with the issue's
targets. Writes JSON with the GPU, driver, clocks, CUDA and package versions. Needs a CUDA
GPU and PyTorch.
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


def network_seconds(torch, run, calls: int = 5) -> float:
    """``run()`` (one network call on device tensors) alone, per call: CUDA events, after warm-up."""
    with torch.inference_mode():
        for _ in range(3):
            run()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            run()
        end.record()
        torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / calls


def tile_inputs(torch, tile: int, batch: int, dtype):
    return torch.randn(batch, 3, tile, tile, device="cuda", dtype=dtype), torch.full((batch,), 500.0, device="cuda")


def run_row(torch, name: str, fn, image: np.ndarray, tile: int, tiles_per_step: int, steps: int,
            network_time: float, peak: float) -> dict:
    """Time ``fn(image)``; a dict it returns with "seconds" (setup excluded) overrides the wall time."""
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    started = time.perf_counter()
    result = fn(image)
    torch.cuda.synchronize()
    seconds = result["seconds"] if isinstance(result, dict) else time.perf_counter() - started
    tile_steps = tiles_per_step * steps
    tflop = GFLOP_PER_256_TILE * (tile / 256) ** 2 * tile_steps / 1000 if network_time > 0 else 0.0  # no network run
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
    parser.add_argument("--compile", action="store_true", help="add the torch.compile row (minutes of compilation)")
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "throughput_gpu.json")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: this benchmark needs one")
    from df5t_deploy.export.network import DF5TNetwork
    from df5t_deploy.export.presets import PRESETS

    image = montage(args.data, args.size)
    peak = matrix_peak_tflops(torch)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        torch.manual_seed(0)
        checkpoint = Path(scratch) / "df5t-512-random.pt"
        torch.save(DF5TNetwork(PRESETS["df5t-512"].network).state_dict(), checkpoint)
        for tile in args.tiles:
            bench = _TileBench(torch, image, tile, args.steps, checkpoint, peak)
            rows += bench.baselines()
            rows.append(bench.ours("ours", compile_network=False))
            rows.append(bench.kernels_alone())
            if args.compile:
                rows.append(bench.ours("ours + torch.compile", compile_network=True))
            if _tensorrt_version() is not None:
                rows.append(bench.ours_tensorrt(Path(scratch)))
    report = {"benchmark": "throughput_gpu", "size": args.size, "steps": args.steps, "rows": rows,
              "matrix_peak_tflops_fp16": round(peak, 1), "machine": _machine(torch)}
    print(_table(report))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


class _TileBench:
    """The rows of one tile size, sharing the image, schedule and random df5t-512 weights."""

    def __init__(self, torch, image: np.ndarray, tile: int, steps: int, checkpoint: Path, peak: float):
        from df5t_deploy.api import Restorer
        from df5t_deploy.backends.torch_backend import TorchBackend
        from df5t_deploy.export.presets import PRESETS
        from df5t_deploy.sampler import Timesteps

        self.torch, self.image, self.tile, self.steps, self.checkpoint, self.peak = torch, image, tile, steps, checkpoint, peak
        self.settings = {"sigma0": SIGMA0, "steps": steps, "seed": 0, "overlap": tile // 8}
        self.calls = len(Timesteps(PRESETS["df5t-512"].schedule, steps))
        self.fp16 = TorchBackend(checkpoint, "cuda", tile=tile, precision="fp16")
        self.per_step = Restorer(checkpoint, backend=self.fp16, **self.settings).denoiser.tiles_per_call(1, *image.shape)

    def _row(self, name, fn, tiles_per_step, network_time, warm_up: bool = True):
        """A timed row; first ``fn`` restores a small crop (kernel compilation, library and
        allocator start-up are not part of the figure)."""
        if warm_up:
            fn(self.image[: 2 * self.tile, : 2 * self.tile])
        return run_row(self.torch, name, fn, self.image, self.tile, tiles_per_step, self.steps, network_time, self.peak)

    def _batched_network_time(self, call_seconds: float, batch: int) -> float:
        return call_seconds * -(-self.per_step // batch) * self.calls

    def baselines(self) -> list[dict]:
        sys.path.insert(0, str(Path(__file__).parent))
        from throughput import run_reference  # the same reference-style loop as the CPU benchmark

        from df5t_deploy.api import Restorer
        from df5t_deploy.export.network import DF5TNetwork
        from df5t_deploy.export.onnx_export import eps_only
        from df5t_deploy.export.presets import PRESETS

        torch, tile = self.torch, self.tile
        fp32 = eps_only(DF5TNetwork(PRESETS["df5t-512"].network)).cuda().eval()
        x32, t1 = tile_inputs(torch, tile, 1, torch.float32)
        net32 = network_seconds(torch, lambda: fp32(x32, t1))
        ref_tiles = len(range(0, self.image.shape[0] - 16, tile - 16)) * len(range(0, self.image.shape[1] - 16, tile - 16))
        reference = self._row("reference-style", lambda im: run_reference(im, tile, self.steps, 16, "cuda"),
                              ref_tiles, net32 * ref_tiles * self.calls, warm_up=False)  # its setup is not timed
        host16 = Restorer(self.checkpoint, backend=_HostOnly(self.fp16), **self.settings)
        eager = self._row("PyTorch fp16 batched eager", host16.restore, self.per_step,
                          self._batched_network_time(self._torch_call_seconds(self.fp16), self.fp16.preferred_batch))
        return [reference, eager]

    def _torch_call_seconds(self, backend) -> float:
        x, t = tile_inputs(self.torch, self.tile, backend.preferred_batch, self.torch.float16)
        return network_seconds(self.torch, lambda: backend.network(x.contiguous(memory_format=self.torch.channels_last), t))

    def ours(self, name: str, compile_network: bool) -> dict:
        from df5t_deploy.api import Restorer
        from df5t_deploy.backends.torch_backend import TorchBackend

        backend = (TorchBackend(self.checkpoint, "cuda", tile=self.tile, precision="fp16", compile_network=True)
                   if compile_network else self.fp16)
        restorer = Restorer(self.checkpoint, backend=backend, **self.settings)
        network_time = self._batched_network_time(self._torch_call_seconds(backend), backend.preferred_batch)
        if compile_network:  # a second batch size makes the compiled batch dimension dynamic, before timing
            x, t = tile_inputs(self.torch, self.tile, 1, self.torch.float16)
            with self.torch.inference_mode():
                backend.network(x.contiguous(memory_format=self.torch.channels_last), t)
        return self._row(name, restorer.restore, self.per_step, network_time)

    def kernels_alone(self) -> dict:
        """The on-device loop with a network that does nothing: what gather, blend, the DDRM
        step kernels and the graph launches cost on their own."""
        from df5t_deploy.api import Restorer

        restorer = Restorer(self.checkpoint, backend=_WithoutNetwork(self.fp16), **self.settings)
        return self._row("operator kernels alone", restorer.restore, self.per_step, 0.0)

    def ours_tensorrt(self, scratch: Path) -> dict:
        from df5t_deploy.api import Restorer
        from df5t_deploy.engines.runtime import TensorRTBackend
        from df5t_deploy.export.checkpoint import load_checkpoint
        from df5t_deploy.export.onnx_export import export_checkpoint
        from df5t_deploy.export.presets import PRESETS

        torch = self.torch
        artifact = scratch / f"df5t-512-tile{self.tile}-fp16.onnx"
        export_checkpoint(load_checkpoint(self.checkpoint), artifact, tile=self.tile, schedule=PRESETS["df5t-512"].schedule,
                          fp16=True, log=lambda message: None)
        backend = TensorRTBackend(artifact, "cuda")  # built (or taken from the cache) before timing
        restorer = Restorer(artifact, backend=backend, **self.settings)
        x, t = tile_inputs(torch, self.tile, backend.max_batch, torch.float16)
        eps = torch.empty_like(x)
        call = network_seconds(torch, lambda: backend.device_network(x, eps, t))
        return self._row(f"ours, TensorRT {_tensorrt_version()}", restorer.restore, self.per_step,
                         self._batched_network_time(call, backend.max_batch))


def _table(report: dict) -> str:
    lines = [f"df5t-512 (random weights), {report['size']} x {report['size']} EM montage, {report['steps']} steps, "
             f"{report['machine']['gpu']}, measured fp16 matrix peak {report['matrix_peak_tflops_fp16']} TFLOP/s"]
    for row in report["rows"]:
        lines.append(f"{row['row']:<30} tile {row['tile']:>4}  {row['seconds']:>8.1f} s  "
                     f"{row['tile_steps_per_s']:>8.1f} tile-steps/s  {row['mpix_per_s']:>7.3f} MPix/s  "
                     f"{row['gpu_memory_gb']:>5.1f} GB  net {row['network_share']:>4.0%}  "
                     f"{row['tflops']:>6.1f} TFLOP/s ({row['tflops_vs_peak']:.0%} of peak)")
    for tile in sorted({row["tile"] for row in report["rows"]}):
        by_name = {row["row"]: row["seconds"] for row in report["rows"] if row["tile"] == tile}
        ours = by_name["ours"]
        lines.append(f"tile {tile}: ours is {by_name['reference-style'] / ours:.2f}x reference-style (target >= 3), "
                     f"{by_name['PyTorch fp16 batched eager'] / ours:.2f}x PyTorch fp16 batched eager (target >= 1.3); "
                     f"operator kernels {by_name['operator kernels alone'] / ours:.1%} of its time (target < 5%); "
                     f"{ours:.1f} s for the image (target < 30 s on one H100 at 4096 x 4096, 20 steps)")
    return "\n".join(lines)


def _tensorrt_version() -> str | None:
    try:
        import tensorrt
    except ImportError:
        return None
    return tensorrt.__version__


class _WithoutNetwork:
    """A backend whose device network writes eps = 0 and computes nothing else."""

    def __init__(self, backend):
        self.name, self.info, self.preferred_batch = backend.name + "-no-network", backend.info, backend.preferred_batch
        self.device_api = backend.device_api

    def device_network(self, tiles, eps_tiles, t) -> None:
        eps_tiles.zero_()


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
