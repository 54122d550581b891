"""Backends turn (x, t) into eps. ``open_backend`` picks one and says why.

On a GPU, ``auto`` tries TensorRT, then onnxruntime's CUDA provider, then PyTorch on CUDA,
and falls back to onnxruntime on the CPU; each skipped backend is reported with its reason.
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


def _open_one(kind: str, model: Path, device: str, threads: int | None) -> Backend:
    return _KINDS[kind].implementation().open_kind(kind, model, device, threads)


def diagnose(gpus: list[str]) -> dict[str, str]:
    """Each backend, in the auto order: "ok", or what it is missing here (``df5t doctor``)."""
    return {kind.name: kind.implementation().diagnose(kind.name, gpus) for kind in REGISTRY}


def candidates(name: str, device: str) -> tuple[str, ...]:
    """The backends to try, in order, for a requested name on a device."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if device == "cpu":
        if not any(kind.option == name for kind in REGISTRY if not kind.on_gpu) and name != "auto":
            raise ValueError(f"--backend {name} runs on a GPU; pass --device cuda (or use onnxruntime on the CPU)")
        return ("onnxruntime-cpu",)
    if not re.fullmatch(r"cuda(:\d+)?", device):
        raise ValueError(f"unknown device {device!r}: use cpu, cuda or cuda:N (N a GPU index)")
    return AUTO_ORDER if name == "auto" else tuple(k.name for k in REGISTRY if k.option == name and k.on_gpu)


def open_backend(
    name: str,
    model: str | Path,
    device: str = "cpu",
    threads: int | None = None,
    report: Callable[[str], None] | None = None,
    opener: Callable[[str, Path, str, int | None], Backend] = _open_one,
) -> Backend:
    """Open ``model`` with the first backend of ``candidates(name, device)`` that works here."""
    reasons = []
    for kind in candidates(name, device):
        try:
            backend = opener(kind, Path(model), device, threads)
        except BackendUnavailable as err:
            reasons.append(f"{kind}: {err}")
            continue
        if report is not None and (reasons or name == "auto"):
            skipped = "; ".join(reasons)
            report(f"backend {backend.name}" + (f" (skipped {skipped})" if skipped else ""))
        return backend
    raise BackendUnavailable("no backend can run here: " + "; ".join(reasons))


__all__ = ["AUTO_ORDER", "BACKENDS", "REGISTRY", "Backend", "BackendKind", "BackendUnavailable", "candidates",
           "diagnose", "open_backend"]
