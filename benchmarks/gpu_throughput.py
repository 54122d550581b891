"""GPU throughput: df5t-512 restoring real EM, ours against two baselines, in one run.

    python benchmarks/gpu_throughput.py [--tile 256] [--steps 20] [--ratio-size 1024] [--size 4096]
                                        [--compile] [--json PATH]

Every row restores the same kind of work (denoising, the same tile, overlap tile/8, steps,
sigma0 and skip schedule) and is timed after a warm-up restore of the same shape. On a
``--ratio-size`` crop of a real EM montage:
- reference-style: how the published code runs. PyTorch fp32 with PyTorch's default TF32
  settings, one tile per network call, every tile restored by its own DDRM loop with the
  state copied to the host at every step, tiles averaged at the end;
- PyTorch fp16 loop on the GPU: what a competent PyTorch user writes (``torch_loop.py``): the
  DDRM loop in torch tensors on the GPU, the fp16 network on batches of tiles, unfold/fold
  blending every step, no graphs, no custom kernels;
- ours: the on-device loop (kernels for gather, blend and the fused DDRM step; fp16 network
  in PyTorch; one step captured as a CUDA graph);
- operator kernels alone: the on-device loop with a network that only zeroes eps (what the
  kernels and graph launches cost by themselves);
- ours + torch.compile (with --compile), ours with TensorRT (where TensorRT is installed).
Then ours alone on the ``--size`` montage (the 30 s target). Each row reports tile-steps/s,
MPix/s, peak GPU memory (PyTorch's allocator), the network's share of the time and its
TFLOP/s against the measured fp16 matrix peak; each is printed and written to the JSON as
soon as it finishes (a run cut short keeps its rows); the table ends with the ratios and
the targets. Needs a CUDA GPU and PyTorch.
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


def montage(source: Path, size: int) -> np.ndarray:
    """A size x size montage tiled (mirrored) from a real EM micrograph."""
    image = tifffile.imread(source)
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
    parser.add_argument("--image", type=Path, default=em_source(), help="the real EM micrograph to tile")
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--ratio-size", type=int, default=1024, help="crop on which every row runs (the ratios)")
    parser.add_argument("--size", type=int, default=4096, help="montage that ours alone restores (0: skip)")
    parser.add_argument("--compile", action="store_true", help="add the torch.compile row (minutes of compilation)")
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "throughput_gpu.json")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: this benchmark needs one")
    from df5t_deploy.export.network import DF5TNetwork
    from df5t_deploy.export.presets import PRESETS

    crop = montage(args.image, args.ratio_size)
    peak = matrix_peak_tflops(torch)
    report = {"benchmark": "throughput_gpu", "tile": args.tile, "overlap": args.tile // 8, "steps": args.steps,
              "ratio_size": args.ratio_size, "size": args.size, "rows": [],
              "matrix_peak_tflops_fp16": round(peak, 1), "machine": _machine(torch)}

    def record(row: dict) -> None:
        report["rows"].append(row)
        print(_row_line(row), flush=True)
        _write_json(args.json, report)

    with tempfile.TemporaryDirectory() as scratch:
        torch.manual_seed(0)
        checkpoint = Path(scratch) / "df5t-512-random.pt"
        torch.save(DF5TNetwork(PRESETS["df5t-512"].network).state_dict(), checkpoint)
        bench = _TileBench(torch, args.tile, args.steps, checkpoint, peak)
        record(bench.reference(crop))
        record(bench.torch_loop(crop))
        record(bench.ours("ours", crop))
        record(bench.kernels_alone(crop))
        if args.compile:
            record(bench.ours("ours + torch.compile", crop, compile_network=True))
        if _tensorrt_version() is not None:
            record(bench.ours_tensorrt(crop, Path(scratch)))
        if args.size:
            record(bench.ours("ours", montage(args.image, args.size)))
    print(_table(report))
    return report


def em_source() -> Path:
    """The real EM micrograph: from ``$DF5T_SHARED`` or ``../shared`` beside the checkout,
    else its 1024 x 1024 crop that travels with the checkout (GPU machines without shared/)."""
    import os

    for root in (os.environ.get("DF5T_SHARED"), REPO.parent / "shared"):
        if root and (Path(root) / "data" / "em" / EM_FILE).is_file():
            return Path(root) / "data" / "em" / EM_FILE
    return next((REPO / "tests" / "data" / "em").glob(EM_FILE.removesuffix(".tif") + "_crop_*.tif"))


def _write_json(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(report, indent=2) + "\n")
    partial.replace(path)


class _TileBench:
    """The rows of one tile size, sharing the schedule and random df5t-512 weights."""

    def __init__(self, torch, tile: int, steps: int, checkpoint: Path, peak: float):
        from df5t_deploy.backends.torch_backend import TorchBackend
        from df5t_deploy.export.presets import PRESETS
        from df5t_deploy.sampler import Timesteps

        self.torch, self.tile, self.steps, self.checkpoint, self.peak = torch, tile, steps, checkpoint, peak
        self.overlap = tile // 8
        # the published walk of one sample, as the plain PyTorch loop runs it: the same network calls
        self.settings = {"sigma0": SIGMA0, "steps": steps, "seed": 0, "overlap": self.overlap, "samples": 1,
                         "walk": "full"}
        self.schedule = PRESETS["df5t-512"].schedule
        self.calls = len(Timesteps(self.schedule, steps))
        self.fp16 = TorchBackend(checkpoint, "cuda", tile=tile, precision="fp16")

    def _tiles_per_step(self, image: np.ndarray) -> int:
        from df5t_deploy.api import Restorer

        return Restorer(self.checkpoint, backend=self.fp16, **self.settings).denoiser.tiles_per_call(1, *image.shape)

    def _row(self, name, fn, image, tiles_per_step, network_time):
        """A timed row, after a warm-up restore of the same shape (kernel compilation, graph
        capture, library and allocator start-up are not part of the figure)."""
        fn(image)
        row = run_row(self.torch, name, fn, image, self.tile, tiles_per_step, self.steps, network_time, self.peak)
        return {**row, "size": image.shape[0], "overlap": self.overlap}

    def _batched_network_time(self, image: np.ndarray, call_seconds: float, batch: int) -> float:
        return call_seconds * -(-self._tiles_per_step(image) // batch) * self.calls

    def reference(self, image: np.ndarray) -> dict:
        sys.path.insert(0, str(Path(__file__).parent))
        from throughput import run_reference  # the same reference-style loop as the CPU benchmark

        from df5t_deploy.export.network import DF5TNetwork
        from df5t_deploy.export.onnx_export import eps_only
        from df5t_deploy.export.presets import PRESETS
        from df5t_deploy.tiling import tile_starts

        torch, tile = self.torch, self.tile
        fp32 = eps_only(DF5TNetwork(PRESETS["df5t-512"].network)).cuda().eval()
        x32, t1 = tile_inputs(torch, tile, 1, torch.float32)
        net32 = network_seconds(torch, lambda: fp32(x32, t1))
        tiles = len(tile_starts(image.shape[0], tile, self.overlap)) * len(tile_starts(image.shape[1], tile, self.overlap))
        return self._row("reference-style", lambda im: run_reference(im, tile, self.steps, 1, "cuda", self.overlap),
                         image, tiles, net32 * tiles * self.calls)  # its setup is not timed (it returns seconds)

    def torch_loop(self, image: np.ndarray) -> dict:
        sys.path.insert(0, str(Path(__file__).parent))
        from torch_loop import restore_with_torch_loop

        batch = self.fp16.preferred_batch
        network = self.fp16.network
        return self._row("PyTorch fp16 loop on the GPU",
                         lambda im: restore_with_torch_loop(network, im, self.schedule, self.tile, self.overlap,
                                                            self.steps, SIGMA0, batch=batch),
                         image, self._tiles_per_step(image),
                         self._batched_network_time(image, self._torch_call_seconds(self.fp16), batch))

    def _torch_call_seconds(self, backend) -> float:
        x, t = tile_inputs(self.torch, self.tile, backend.preferred_batch, self.torch.float16)
        return network_seconds(self.torch, lambda: backend.network(x.contiguous(memory_format=self.torch.channels_last), t))

    def ours(self, name: str, image: np.ndarray, compile_network: bool = False) -> dict:
        from df5t_deploy.api import Restorer
        from df5t_deploy.backends.torch_backend import TorchBackend

        backend = (TorchBackend(self.checkpoint, "cuda", tile=self.tile, precision="fp16", compile_network=True)
                   if compile_network else self.fp16)
        restorer = Restorer(self.checkpoint, backend=backend, **self.settings)
        network_time = self._batched_network_time(image, self._torch_call_seconds(backend), backend.preferred_batch)
        if compile_network:  # a second batch size makes the compiled batch dimension dynamic, before timing
            x, t = tile_inputs(self.torch, self.tile, 1, self.torch.float16)
            with self.torch.inference_mode():
                backend.network(x.contiguous(memory_format=self.torch.channels_last), t)
        return self._row(name, restorer.restore, image, self._tiles_per_step(image), network_time)

    def kernels_alone(self, image: np.ndarray) -> dict:
        """The on-device loop with a network that does nothing: what gather, blend, the DDRM
        step kernels and the graph launches cost on their own."""
        from df5t_deploy.api import Restorer

        restorer = Restorer(self.checkpoint, backend=_WithoutNetwork(self.fp16), **self.settings)
        return self._row("operator kernels alone", restorer.restore, image, self._tiles_per_step(image), 0.0)

    def ours_tensorrt(self, image: np.ndarray, scratch: Path) -> dict:
        from df5t_deploy.api import Restorer
        from df5t_deploy.backends.tensorrt_backend import TensorRTBackend
        from df5t_deploy.export.checkpoint import load_checkpoint
        from df5t_deploy.export.onnx_export import export_checkpoint

        torch = self.torch
        artifact = scratch / f"df5t-512-tile{self.tile}-fp16.onnx"
        export_checkpoint(load_checkpoint(self.checkpoint), artifact, tile=self.tile, schedule=self.schedule,
                          fp16=True, log=lambda message: None)
        backend = TensorRTBackend(artifact, "cuda")  # built (or taken from the cache) before timing
        restorer = Restorer(artifact, backend=backend, **self.settings)
        x, t = tile_inputs(torch, self.tile, backend.max_batch, torch.float16)
        eps = torch.empty_like(x)
        call = network_seconds(torch, lambda: backend.device_network(x, eps, t))
        return self._row(f"ours, TensorRT {_tensorrt_version()}", restorer.restore, image, self._tiles_per_step(image),
                         self._batched_network_time(image, call, backend.max_batch))


TARGETS = {"reference": 3.0, "torch_loop": 1.3, "kernel_share": 0.05, "full_image_seconds": 30.0}


def _row_line(row: dict) -> str:
    return (f"{row['row']:<30} {row['size']:>5} px tile {row['tile']:>4}  {row['seconds']:>8.1f} s  "
            f"{row['tile_steps_per_s']:>8.1f} tile-steps/s  {row['mpix_per_s']:>7.3f} MPix/s  "
            f"{row['gpu_memory_gb']:>5.1f} GB  net {row['network_share']:>4.0%}  "
            f"{row['tflops']:>6.1f} TFLOP/s ({row['tflops_vs_peak']:.0%} of peak)")


def ratios(report: dict) -> dict:
    """Ours against the baselines on the ratio crop, and ours on the full montage, with the
    targets; a figure whose rows are missing (a run cut short) is None."""
    on_crop = {row["row"]: row["seconds"] for row in report["rows"] if row["size"] == report["ratio_size"]}
    full = [row["seconds"] for row in report["rows"] if row["row"] == "ours" and row["size"] == report["size"]]
    ours = on_crop.get("ours")

    def over(name):
        return round(on_crop[name] / ours, 2) if ours and name in on_crop else None

    return {"vs_reference": over("reference-style"), "vs_torch_loop": over("PyTorch fp16 loop on the GPU"),
            "kernel_share": round(on_crop["operator kernels alone"] / ours, 3)
            if ours and "operator kernels alone" in on_crop else None,
            "full_image_seconds": full[0] if full else None, "targets": TARGETS}


def _table(report: dict) -> str:
    r = ratios(report)
    lines = [f"df5t-512 (random weights), tile {report['tile']}, overlap {report['overlap']}, {report['steps']} steps, "
             f"{report['machine']['gpu']}, measured fp16 matrix peak {report['matrix_peak_tflops_fp16']} TFLOP/s"]
    lines += [_row_line(row) for row in report["rows"]]

    def verdict(value, target, higher_is_better=True):
        if value is None:
            return "not measured"
        met = value >= target if higher_is_better else value < target
        return f"{value} ({'meets' if met else 'MISSES'} target {'>=' if higher_is_better else '<'} {target})"

    lines.append(f"ours vs reference-style: {verdict(r['vs_reference'], TARGETS['reference'])}x; "
                 f"vs PyTorch fp16 loop on the GPU: {verdict(r['vs_torch_loop'], TARGETS['torch_loop'])}x; "
                 f"operator kernels' share: {verdict(r['kernel_share'], TARGETS['kernel_share'], False)}; "
                 f"{report['size']} x {report['size']} in "
                 f"{verdict(r['full_image_seconds'], TARGETS['full_image_seconds'], False)} s")
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

    def close(self) -> None:
        pass  # the wrapped backend belongs to the benchmark


def _machine(torch) -> dict:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem",
                          "--format=csv,noheader"], capture_output=True, text=True)
    import df5t_deploy

    return {"gpu": torch.cuda.get_device_name(), "nvidia_smi": smi.stdout.strip(), "cuda": torch.version.cuda,
            "torch": torch.__version__, "df5t_deploy": df5t_deploy.__version__, "python": sys.version.split()[0]}


if __name__ == "__main__":
    main()
