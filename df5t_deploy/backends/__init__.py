"""Backends turn (x, t) into eps. ``open_backend`` picks one and says why."""

from __future__ import annotations

from pathlib import Path

from .base import Backend, BackendUnavailable

BACKENDS = ("auto", "onnxruntime")


def open_backend(name: str, model: str | Path, device: str = "cpu", threads: int | None = None) -> Backend:
    """Open ``model`` with the named backend ("auto" picks the best one available)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    from .onnxruntime_backend import OnnxRuntimeBackend

    return OnnxRuntimeBackend(model, device=device, threads=threads)


__all__ = ["BACKENDS", "Backend", "BackendUnavailable", "open_backend"]
