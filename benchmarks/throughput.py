"""End-to-end CPU throughput: ours against a reference-style baseline, in the same run.

    python benchmarks/throughput.py [--size 512] [--tile 256] [--steps 10] [--repeats 3]

Restores (denoise) a real EM crop with the df5t-512 architecture (random weights: speed does
not depend on them). Both variants use the same tile grid (16 px overlap) and thread count:

- reference-style: how the published code runs. PyTorch eager fp32, one tile per network
  call, every tile restored by its own DDRM loop with the algebra in torch and the state
  copied to the host at every step, tiles averaged at the end.
- ours: the df5t-deploy runtime (onnxruntime CPU, per-step blending of all tiles).

Each variant runs in a fresh process (so peak RSS is its own); the median of the repeats
is reported. A second table times the network alone at batch 1 and 4, which is how the CPU
batch size is chosen. Prints tables and writes JSON (default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
EM_FILE = "micrograph_vemstitch-mussel_tile3_2_2_1768x2048.tif"
OVERLAP = 16
SIGMA0 = 0.2


def _crop(data_dir: Path, size: int) -> np.ndarray:
    import tifffile

    image = tifffile.imread(data_dir / EM_FILE)
    y0, x0 = (image.shape[0] - size) // 2, (image.shape[1] - size) // 2
    return np.ascontiguousarray(image[y0 : y0 + size, x0 : x0 + size])


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _network(seed: int = 0):
    import torch
    from df5t_deploy.export.network import DF5TNetwork
    from df5t_deploy.export.presets import PRESETS

    torch.manual_seed(seed)
    return DF5TNetwork(PRESETS["df5t-512"].network).eval()


# --------------------------------------------------------------------- reference style


def run_reference(image: np.ndarray, tile: int, steps: int, threads: int, device: str = "cpu",
                  overlap: int = OVERLAP) -> dict:
    """The published way: per-tile DDRM in torch, batch 1, host copies, average at the end."""
    import torch

    from df5t_deploy.artifact import Schedule
    from df5t_deploy.sampler import Timesteps
    from df5t_deploy.tiling import tile_starts

    torch.set_num_threads(threads)
    net = _network().to(device)
    timesteps = Timesteps(Schedule(1000), steps)
    y = torch.from_numpy(image.astype(np.float32) / 255.0 * 2 - 1).to(device)
    ys, xs = (tile_starts(n, tile, overlap) for n in image.shape)
    out = torch.zeros_like(y)
    count = torch.zeros_like(y)
    started = time.perf_counter()
    with torch.no_grad():
        for top in ys:
            for left in xs:
                patch = y[top : top + tile, left : left + tile]
                restored = _reference_ddrm(net, patch, timesteps)
                out[top : top + tile, left : left + tile] += restored
                count[top : top + tile, left : left + tile] += 1
    result = out / count
    box = torch.nn.functional.avg_pool2d(result[None, None], 3, 1, 1, count_include_pad=False)[0, 0]
    result = result + 0.4 * (result - box)  # the published stitching's sharpening
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "peak_rss_mb": _peak_rss_mb(), "network_calls": len(ys) * len(xs) * len(timesteps)}


def _reference_ddrm(net, y, timesteps):
    """DDRM denoising (H = channel mean, so V is the channel basis) in torch, one tile."""
    import torch

    from df5t_deploy.sampler import CHANNEL_BASIS, GREY_GAIN

    q = torch.from_numpy(CHANNEL_BASIS.astype(np.float32)).to(y.device)
    s = float(GREY_GAIN)
    sig = timesteps.init_sigma
    ybar = y  # U^T y for H = channel mean (spatial identity)
    z = torch.randn(3, *y.shape, device=y.device)
    a = z * sig
    a[0] = ybar / s + (sig**2 - SIGMA0**2 / s**2) ** 0.5 * z[0]
    x = torch.einsum("kc,khw->chw", q, a) / sig
    host_xs, host_x0s = [], []
    for plan in timesteps:
        eps = net(x[None], torch.tensor([float(plan.t)], device=y.device))[0, :3]
        x0 = (x - (1 - plan.alpha_bar) ** 0.5 * eps) / plan.alpha_bar**0.5
        sn = ((1 - plan.alpha_bar_next) / plan.alpha_bar_next) ** 0.5
        v0 = torch.einsum("ck,khw->chw", q, x0)
        ve = torch.einsum("ck,khw->chw", q, eps)
        vz = torch.randn(3, *y.shape, device=y.device)
        c = (sn**2 - (0.85 * sn) ** 2) ** 0.5
        v = v0 + c * ve + 0.85 * sn * vz
        if s * sn > SIGMA0:
            v[0] = ybar / s + (sn**2 - SIGMA0**2 / s**2) ** 0.5 * vz[0]
        else:
            v[0] = v0[0] + c * (ybar - s * v0[0]) / SIGMA0 + 0.85 * sn * vz[0]
        x = plan.alpha_bar_next**0.5 * torch.einsum("kc,khw->chw", q, v)
        host_xs.append(x.detach().to("cpu", copy=True))  # the published loop keeps every state
        host_x0s.append(x0.detach().to("cpu", copy=True))
    return ((x + 1) / 2).clamp(0, 1).mean(0) * 2 - 1


# --------------------------------------------------------------------- ours


def run_ours(image: np.ndarray, model: str, steps: int, threads: int, batch: int | None) -> dict:
    from df5t_deploy.api import Restorer

    restorer = Restorer(model, "denoise", sigma0=SIGMA0, steps=steps, overlap=OVERLAP, batch=batch, threads=threads,
                        samples=1, walk="full")  # the reference's walk: the same network calls
    started = time.perf_counter()
    restorer.restore(image)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "peak_rss_mb": _peak_rss_mb(), "network_calls": restorer.denoiser.tiles_run,
            "batch": restorer.batch}


def time_network(model: str, batch: int, threads: int, repeats: int) -> dict:
    from df5t_deploy.backends.onnxruntime_backend import OnnxRuntimeBackend

    backend = OnnxRuntimeBackend(model, threads=threads)
    tile = backend.info.tile
    x = np.random.default_rng(0).standard_normal((batch, 3, tile, tile), dtype=np.float32)
    t = np.full(batch, 500.0, np.float32)
    backend(x, t)  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        backend(x, t)
        times.append(time.perf_counter() - started)
    return {"batch": batch, "seconds_per_tile": statistics.median(times) / batch}


def _in_child(function, *args):
    """Run in a fresh process so peak RSS and library state are the variant's own.

    A child's peak RSS starts at its parent's RSS at fork, so this process stays small:
    it never imports torch or onnxruntime itself.
    """
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(function, args)


def _library_versions() -> dict:
    import onnxruntime
    import torch

    return {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__}


def _export(tile: int, folder: Path) -> str:
    import torch
    from df5t_deploy.export.checkpoint import load_checkpoint
    from df5t_deploy.export.onnx_export import export_checkpoint
    from df5t_deploy.export.presets import PRESETS

    checkpoint = folder / "df5t-512-random.pt"
    torch.save(_network().state_dict(), checkpoint)
    model = folder / f"df5t-512-tile{tile}.onnx"
    export_checkpoint(load_checkpoint(checkpoint), model, tile=tile, schedule=PRESETS["df5t-512"].schedule,
                      log=lambda message: print("  export:", message.strip()))
    return str(model)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "em")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "throughput_cpu.json")
    args = parser.parse_args(argv)
    image = _crop(args.data, args.size)
    with tempfile.TemporaryDirectory() as scratch:
        print(f"exporting df5t-512 (random weights) at tile {args.tile} ...")
        model = _in_child(_export, args.tile, Path(scratch))  # keeps torch out of this process
        rows = {"reference-style": [], "ours": []}
        for repeat in range(args.repeats):  # interleaved, so drifts hit both alike
            rows["reference-style"].append(_in_child(run_reference, image, args.tile, args.steps, args.threads))
            rows["ours"].append(_in_child(run_ours, image, model, args.steps, args.threads, None))
            print(f"  repeat {repeat + 1}/{args.repeats}: reference {rows['reference-style'][-1]['seconds']:.1f} s, "
                  f"ours {rows['ours'][-1]['seconds']:.1f} s")
        network = [_in_child(time_network, model, b, args.threads, args.repeats) for b in (1, 4)]
    report = _report(args, rows, network)
    print(_table(report))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")
    return report


def _report(args, rows: dict, network: list) -> dict:
    summary = {}
    for name, runs in rows.items():
        seconds = statistics.median(r["seconds"] for r in runs)
        summary[name] = {
            "median_seconds": seconds,
            "all_seconds": [r["seconds"] for r in runs],
            "mpix_per_s": args.size**2 / 1e6 / seconds,
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
            "network_calls": runs[0]["network_calls"],
        }
    summary["ours"]["speedup"] = summary["reference-style"]["median_seconds"] / summary["ours"]["median_seconds"]
    return {
        "benchmark": "throughput_cpu",
        "image": f"{EM_FILE} centre crop {args.size}x{args.size}",
        "model": "df5t-512 architecture, random weights",
        "tile": args.tile, "overlap": OVERLAP, "steps": args.steps, "repeats": args.repeats, "threads": args.threads,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0],
                    **_in_child(_library_versions)},
        "rows": summary,
        "network_only": network,
    }


def _table(report: dict) -> str:
    lines = [
        f"df5t-512, {report['image']}, tile {report['tile']} (overlap {report['overlap']}), "
        f"{report['steps']} steps, {report['threads']} threads, median of {report['repeats']}",
        f"{'variant':<18}{'seconds':>10}{'MPix/s':>10}{'net calls':>11}{'peak RSS MB':>13}{'speed-up':>10}",
    ]
    for name, row in report["rows"].items():
        lines.append(f"{name:<18}{row['median_seconds']:>10.1f}{row['mpix_per_s']:>10.4f}{row['network_calls']:>11}"
                     f"{row['peak_rss_mb']:>13.0f}{row.get('speedup', 1.0):>9.2f}x")
    lines.append("network alone (onnxruntime CPU): " + ", ".join(
        f"batch {n['batch']}: {n['seconds_per_tile']:.2f} s/tile" for n in report["network_only"]))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
