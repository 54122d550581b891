"""A device is checked before it is trusted with data.

Our kernels and on-device loop will meet GPUs, drivers and CUDA versions never tested; a
wrong kernel would corrupt results silently. Before the on-device loop is first used on a
device, ``self_check`` runs one small walk of the device loop per operator (identity,
inpainting, block means R x R and k x 1, Gaussian blur) and one with fp16 tiles, so every
kernel runs, each against the host loop (the numpy twins), with a network that returns its
input tiles as eps (no model is involved, and the tiles' gather and blend still matter):
tolerance 1e-5 on the [0, 1] scale (1e-3 with fp16 tiles: a state that differs from the
host's in its last float32 bit may round to another fp16 value, measured 1.5e-4 on the CPU
emulation; a broken conversion errs by far more).

The verdict is cached under the cache root, keyed by the device's identity (GPU, driver,
CUDA runtime), the package version and the kernels' source; a device that failed uses the
host loop (its network stays on the GPU) until one of those changes.
"""

from __future__ import annotations

import hashlib
import json
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .artifact import Schedule
from .cuda import kernel_source
from .device_loop import Device, DeviceSampler
from .files import atomic_path, cache_root
from .noise import ORIENTATION_XZ, NoiseKey
from .operators import BlockMean, GaussianBlur, Identity, Inpainting, SpatialOperator
from .progress import ProgressTracker
from .sampler import SamplerSettings
from .tiling import BlendedDenoiser, TileGrid
from .version import __version__
from .walks import restore_group

#: Largest difference from the host loop, on the [0, 1] scale, that passes (fp32, fp16 tiles).
TOLERANCE = {np.dtype(np.float32): 1e-5, np.dtype(np.float16): 1e-3}
_SHAPE = (24, 20)
_TILE, _OVERLAP = 16, 4
_SETTINGS = SamplerSettings(sigma0=0.1, steps=4)
_SCHEDULE = Schedule(1000)
_KEY = NoiseKey(2**40 + 3, ORIENTATION_XZ, range(7, 8), y0=5, x0=9)  # a 64-bit seed, an orientation and offsets


class DeviceCheckError(RuntimeError):
    """The device failed its self-check (``strict_gpu``); the message says how and where the
    details are."""


@dataclass(frozen=True)
class Verdict:
    passed: bool
    summary: str  # "every walk within its tolerance of the host loop", or what differed
    details: Path  # the JSON with every walk's result


def _walks() -> dict[str, tuple[SpatialOperator, np.dtype]]:
    missing = np.zeros(_SHAPE, bool)
    missing[6:14, 4:12] = True
    return {
        "denoise": (Identity(_SHAPE), np.dtype(np.float32)),
        "denoise, fp16 tiles": (Identity(_SHAPE), np.dtype(np.float16)),
        "inpaint": (Inpainting(missing), np.dtype(np.float32)),
        "sr 2 x 2": (BlockMean(_SHAPE, (2, 2)), np.dtype(np.float32)),
        "isotropic k = 4": (BlockMean(_SHAPE, (4, 1)), np.dtype(np.float32)),
        "deblur": (GaussianBlur(_SHAPE, (1.2, 1.2)), np.dtype(np.float32)),
    }


def device_key(device: Device) -> dict:
    """What the verdict holds for: the device, this package and these kernels."""
    return {**device.identity(), "df5t_deploy": __version__,
            "kernels_sha256": hashlib.sha256(kernel_source().encode()).hexdigest()[:16]}


def _verdict_path(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_root() / "device-checks" / f"{digest}.json"


def self_check(device: Device) -> Verdict:
    """Run every walk on ``device`` and against the host loop; write and return the verdict."""
    key = device_key(device)
    results = {}
    for name, (op, tile_dtype) in _walks().items():
        try:
            error = _walk_error(device, op, tile_dtype)
            results[name] = {"max_error": error, "tolerance": TOLERANCE[tile_dtype],
                             "passed": bool(error <= TOLERANCE[tile_dtype])}
        except Exception as err:  # any failure of the device is a verdict, not a crash
            results[name] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(),
                             "passed": False}
    failed = [name for name, result in results.items() if not result["passed"]]
    summary = ("every walk within its tolerance of the host loop" if not failed else
               "; ".join(f"{name}: " + (results[name].get("error") or f"max error {results[name]['max_error']:.3g}")
                         for name in failed))
    path = _verdict_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"key": key, "passed": not failed, "summary": summary, "walks": results},
                                  indent=2, default=str) + "\n")
    return Verdict(not failed, summary, path)


def cached_verdict(device: Device) -> Verdict | None:
    path = _verdict_path(device_key(device))
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return Verdict(bool(record.get("passed")), str(record.get("summary", "")), path)


def trusted_verdict(device: Device) -> Verdict:
    """The cached verdict for this device, package and kernels, or a fresh check."""
    return cached_verdict(device) or self_check(device)


def _walk_error(device: Device, op: SpatialOperator, tile_dtype: np.dtype) -> float:
    """Largest difference between the device loop and the host loop on one walk."""
    rng = np.random.default_rng(0)
    y = rng.uniform(-1, 1, (1, *op.measurement_shape)).astype(np.float32)
    samples = 2
    def echo(x, t):  # eps = the tiles as the device holds them
        return x.astype(tile_dtype).astype(np.float32)

    denoiser = BlendedDenoiser(echo, _TILE, _OVERLAP, batch=4)
    tracker = ProgressTracker(None, 1, 1, 1)
    host = restore_group(y, op, _SCHEDULE, _SETTINGS, denoiser, _KEY, samples, tracker)
    sampler = DeviceSampler(device, op, _SCHEDULE, _SETTINGS, TileGrid(*op.shape, _TILE, _OVERLAP), samples, samples,
                            tile_dtype)
    on_device = sampler.start(y, lambda tiles, eps_tiles, t: device.copy(eps_tiles, tiles), _KEY).result()
    on_device = np.asarray(on_device).reshape(host.shape)
    return float(np.abs(on_device - host).max()) if np.isfinite(on_device).all() else float("inf")
