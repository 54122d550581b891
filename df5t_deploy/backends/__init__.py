"""Backends turn (x, t) into eps. ``open_backend`` picks one and says why.

Devices: ``cpu``; ``cuda[:N]``, a GPU, which must be usable (an explicit device never falls
back); ``auto``, a GPU if one can run, else the CPU, saying so. Backend ``auto`` tries
TensorRT, then onnxruntime's CUDA provider, then PyTorch on CUDA (and, on device ``auto``,
onnxruntime on the CPU last); each skipped backend is reported with its reason.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .base import Backend, BackendUnavailable


@dataclass(frozen=True)
class BackendKind:
    """One backend of the registry: its name (as reported), the ``--backend`` choice that
    asks for it, whether it runs on a GPU, and its module, which provides
    ``open_kind(name, model, device, threads)`` and ``diagnose(name, gpus)`` ("ok" or what is
    missing, for ``df5t doctor``). A new backend is its module and one line here."""

    name: str
    option: str
    on_gpu: bool
    module: str

    def implementation(self):
        return importlib.import_module(f"{__name__}.{self.module}")


#: Every backend, in the order ``auto`` tries them on a GPU (the CPU one last).
REGISTRY = (
    BackendKind("tensorrt", "tensorrt", on_gpu=True, module="tensorrt_backend"),
    BackendKind("onnxruntime-cuda", "onnxruntime", on_gpu=True, module="onnxruntime_backend"),
    BackendKind("torch-cuda", "torch", on_gpu=True, module="torch_backend"),
    BackendKind("onnxruntime-cpu", "onnxruntime", on_gpu=False, module="onnxruntime_backend"),
)
#: The ``--backend`` choices.
BACKENDS = ("auto", *dict.fromkeys(kind.option for kind in REGISTRY))
AUTO_ORDER = tuple(kind.name for kind in REGISTRY)
_KINDS = {kind.name: kind for kind in REGISTRY}
#: The ``--device`` that takes a GPU where one can run and the CPU otherwise (the default).
AUTO_DEVICE = "auto"


def _open_one(kind: str, model: Path, device: str, threads: int | None) -> Backend:
    return _KINDS[kind].implementation().open_kind(kind, model, device, threads)


def diagnose(gpus: list[str]) -> dict[str, str]:
    """Each backend, in the auto order: "ok", or what it is missing here (``df5t doctor``)."""
    return {kind.name: kind.implementation().diagnose(kind.name, gpus) for kind in REGISTRY}


def check_device(device: str) -> str:
    """``device`` if it names a device (cpu, cuda, cuda:N or auto), else a one-line error."""
    if device not in ("cpu", AUTO_DEVICE) and not re.fullmatch(r"cuda(:\d+)?", device):
        raise ValueError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N (N a GPU index)")
    return device


def candidates(name: str, device: str) -> tuple[str, ...]:
    """The backends to try, in order, for a requested name on a device."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    check_device(device)
    wanted = [kind for kind in REGISTRY if name in ("auto", kind.option)]
    if device == "cpu":
        wanted = [kind for kind in wanted if not kind.on_gpu]
        if not wanted:
            raise ValueError(f"--backend {name} runs on a GPU; pass --device cuda (or use onnxruntime on the CPU)")
    elif device != AUTO_DEVICE:
        wanted = [kind for kind in wanted if kind.on_gpu]
    return tuple(kind.name for kind in wanted)


def device_for(kind: str, device: str) -> str:
    """The device a backend kind opens on: device ``auto`` is the first GPU for a GPU kind."""
    if device != AUTO_DEVICE:
        return device
    return "cuda" if _KINDS[kind].on_gpu else "cpu"


def open_backend(
    name: str,
    model: str | Path,
    device: str = AUTO_DEVICE,
    threads: int | None = None,
    report: Callable[[str], None] | None = None,
    opener: Callable[[str, Path, str, int | None], Backend] = _open_one,
) -> Backend:
    """Open ``model`` with the first backend of ``candidates(name, device)`` that works here."""
    reasons = []
    for kind in candidates(name, device):
        try:
            backend = opener(kind, Path(model), device_for(kind, device), threads)
        except BackendUnavailable as err:
            reasons.append(f"{kind}: {err}")
            continue
        if report is not None and (reasons or name == "auto" or device == AUTO_DEVICE):
            skipped = "; ".join(reasons)
            fell_back = device == AUTO_DEVICE and not _KINDS[kind].on_gpu
            where = " (device auto: no GPU backend can run here)" if fell_back else ""
            report(f"backend {backend.name}{where}" + (f" (skipped {skipped})" if skipped else ""))
        return backend
    if device.startswith("cuda"):
        raise BackendUnavailable(f"--device {device}: no backend can run on it here: " + "; ".join(reasons)
                                 + ". Pass --device cpu, or --device auto to fall back to the CPU")
    raise BackendUnavailable("no backend can run here: " + "; ".join(reasons))


__all__ = ["AUTO_DEVICE", "AUTO_ORDER", "BACKENDS", "REGISTRY", "Backend", "BackendKind", "BackendUnavailable", "candidates",
           "check_device", "device_for", "diagnose", "open_backend"]
