"""Latency and frame rate of restoring frames as they are acquired, in process.

    python benchmarks/streaming.py [--steps 10] [--tiny 16] [--small 8] [--large 2] [--smoke]

Frames are crops of held-out real EM (mussel tile 3), in three sets: ``--tiny`` of 64 x 64
(one tile of the bundled model each: frames that walk together fill the backend's batch),
``--small`` of 512 x 512 and ``--large`` of 2048 x 2048 (a 1768-row tile: the large crop is
tiled from it), restored with the bundled model at ``--steps``, denoising at sigma0 0.1. For
each set, in the same process:

- baseline: ``restore()`` called once per frame, one after another (what a script without
  the streaming API does);
- ``submit`` at queue depth 1: a frame is submitted when the previous result arrived;
- ``submit`` at queue depth 4: up to four frames in flight, so preparation of the next frame
  overlaps the restoration of the current one, and frames prepared in time walk together
  and share network calls;
- for the 512 x 512 set, through ``df5t serve`` on loopback (same model and settings, its own
  process), with 1 and 4 requests in flight (``client.restore_remote``): what an acquisition
  PC sees, TIFF encoding and HTTP included.

Latency is from the call (or submit) to the result; frames per second over the whole set.
Every result is checked equal to ``restore()`` of the same frame, bit for bit. Results go to
benchmarks/results/streaming_<device>.json with the command and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
EM_FILE = "micrograph_vemstitch-mussel_tile3_2_2_1768x2048.tif"


def frame_sets(data_dir: Path, tiny: int, small: int, large: int) -> dict[str, list[np.ndarray]]:
    import tifffile

    tile = tifffile.imread(data_dir / EM_FILE)

    def crops(count: int, size: int) -> list[np.ndarray]:
        return [np.ascontiguousarray(tile[(97 * i) % 1200 : (97 * i) % 1200 + size,
                                          300 * i % 1500 : 300 * i % 1500 + size]) for i in range(count)]

    big = np.concatenate([tile, tile[::-1]], axis=0)[:2048, :2048]  # the tile and its mirror: 2048 rows
    sets = {"64 x 64": crops(tiny, 64), "512 x 512": crops(small, 512),
            "2048 x 2048": [np.ascontiguousarray(np.roll(big, 512 * i, axis=1)) for i in range(large)]}
    return {name: images for name, images in sets.items() if images}


def _summary(latencies: list[float], seconds: float, count: int) -> dict:
    ordered = sorted(latencies)
    return {"frames": count, "seconds": round(seconds, 2), "frames_per_s": round(count / seconds, 4),
            "latency_p50_s": round(statistics.median(ordered), 3),
            "latency_p95_s": round(ordered[min(len(ordered) - 1, int(np.ceil(0.95 * len(ordered))) - 1)], 3)}


def run_baseline(restorer, images: list[np.ndarray]) -> tuple[dict, list[np.ndarray]]:
    latencies, results = [], []
    started = time.perf_counter()
    for image in images:
        t0 = time.perf_counter()
        results.append(restorer.restore(image))
        latencies.append(time.perf_counter() - t0)
    return _summary(latencies, time.perf_counter() - started, len(images)), results


def run_submit(restorer, images: list[np.ndarray], depth: int) -> tuple[dict, list[np.ndarray]]:
    latencies, results = [], []
    in_flight: deque = deque()
    started = time.perf_counter()

    def finish_oldest():
        submitted, future = in_flight.popleft()
        results.append(future.result().image)
        latencies.append(time.perf_counter() - submitted)

    for image in images:
        if len(in_flight) == depth:
            finish_oldest()
        in_flight.append((time.perf_counter(), restorer.submit(image)))
    while in_flight:
        finish_oldest()
    return _summary(latencies, time.perf_counter() - started, len(images)), results


def run_server(url: str, images: list[np.ndarray], depth: int) -> tuple[dict, list[np.ndarray]]:
    from concurrent.futures import ThreadPoolExecutor

    from df5t_deploy.client import restore_remote

    def timed(image):
        t0 = time.perf_counter()
        result = restore_remote(url, image, busy_wait=3600)
        return time.perf_counter() - t0, result

    started = time.perf_counter()
    with ThreadPoolExecutor(depth) as pool:
        answers = list(pool.map(timed, images))
    return (_summary([t for t, _ in answers], time.perf_counter() - started, len(images)),
            [result for _, result in answers])


def start_server(steps: int, device: str):
    import subprocess

    process = subprocess.Popen([sys.executable, "-c", "from df5t_deploy.cli import entry; entry()", "serve",
                                "--port", "0", "--sigma0", "0.1", "--steps", str(steps), "--samples", "1", "--walk", "full",
                                "--device", device,
                                "--max-pending", "4", "--request-timeout", "86400"], stdout=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    if not line.startswith("listening on "):
        raise SystemExit(f"df5t serve did not start: {line}")
    return process, line.split()[-1]


SERVED_SET = "512 x 512"


def _check(name: str, results: list[np.ndarray], expected: list[np.ndarray]) -> None:
    if not all(np.array_equal(a, b) for a, b in zip(results, expected, strict=True)):
        raise SystemExit(f"{name}: a result differs from restore() of the same frame")


def measure_in_process(restorer, images: list[np.ndarray]) -> tuple[dict, list[np.ndarray]]:
    rows = {}
    rows["restore() one by one"], expected = run_baseline(restorer, images)
    for depth in (1, 4):
        name = f"submit, queue depth {depth}"
        rows[name], results = run_submit(restorer, images, depth)
        _check(name, results, expected)
    return rows, expected


def measure_served(steps: int, device: str, images: list[np.ndarray], expected: list[np.ndarray]) -> dict:
    rows = {}
    server, url = start_server(steps, device)
    try:
        for depth in (1, 4):
            name = f"df5t serve, {depth} in flight"
            rows[name], results = run_server(url, images, depth)
            _check(name, results, expected)
    finally:
        server.terminate()
        server.wait()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "em")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--tiny", type=int, default=16)
    parser.add_argument("--small", type=int, default=8)
    parser.add_argument("--large", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--smoke", action="store_true", help="4 tiny frames, 2 small, 0 large, 2 steps (CI)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    if args.smoke:
        args.tiny, args.small, args.large, args.steps = 4, 2, 0, 2
    from df5t_deploy import Restorer

    sets = frame_sets(args.data, args.tiny, args.small, args.large)
    restorer = Restorer(sigma0=0.1, steps=args.steps, samples=1, walk="full", device=args.device, max_pending=4)
    restorer.restore(next(iter(sets.values()))[0][:256, :256])  # warm-up: the session and its first shapes
    table = {}
    for name, images in sets.items():
        table[name], expected = measure_in_process(restorer, images)
        if name == SERVED_SET:
            table[name].update(measure_served(args.steps, args.device, images, expected))
        print(f"{name}: {len(images)} frames")
        for row_name, row in table[name].items():
            print(f"  {row_name:28s} {row['frames_per_s']:9.3f} frames/s  p50 {row['latency_p50_s']:8.2f} s"
                  f"  p95 {row['latency_p95_s']:8.2f} s", flush=True)
    restorer.close()
    record = {"command": "python " + " ".join([os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]]),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "device": args.device},
              "model": str(restorer.model_path.name), "steps": args.steps, "batch": restorer.batch,
              "frames": {name: len(images) for name, images in sets.items()}, "rows": table,
              "identical_to_restore": True}
    if not args.smoke:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"streaming_{args.device.replace(':', '')}.json"
        path.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
