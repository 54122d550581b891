"""What this machine can run, and why not: ``df5t doctor``."""

from __future__ import annotations

import importlib
import os
import platform
import shutil
import subprocess
import sys

import numpy as np

from . import __version__

CPU_FLAGS_OF_INTEREST = ("avx", "avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "neon", "asimd")


def _version(module: str) -> str | None:
    try:
        return getattr(importlib.import_module(module), "__version__", "unknown")
    except Exception:  # any import failure means "not usable here"
        return None


def _cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    present = set(line.split(":", 1)[1].split())
                    return [flag for flag in CPU_FLAGS_OF_INTEREST if flag in present]
    except OSError:
        pass
    return []


def _gpus() -> list[str]:
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10, check=True)
    except (subprocess.SubprocessError, OSError):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def _backends(providers: list[str], gpus: list[str]) -> dict[str, str]:
    ort_ok = "CPUExecutionProvider" in providers
    status = {"onnxruntime-cpu": "ok" if ort_ok else "onnxruntime is not installed: pip install onnxruntime"}
    if "CUDAExecutionProvider" not in providers:
        status["onnxruntime-cuda"] = "no CUDA provider: install onnxruntime-gpu in place of onnxruntime"
    elif not gpus:
        status["onnxruntime-cuda"] = "CUDA provider present but no NVIDIA GPU seen (nvidia-smi)"
    else:
        status["onnxruntime-cuda"] = "ok"
    return status


def collect() -> dict:
    try:
        import onnxruntime as ort

        providers = list(ort.get_available_providers())
        ort_version = ort.__version__
    except ImportError:
        providers, ort_version = [], None
    gpus = _gpus()
    return {
        "df5t_deploy": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": {"machine": platform.machine(), "cores": os.cpu_count(), "flags": _cpu_flags()},
        "numpy": np.__version__,
        "onnxruntime": ort_version,
        "onnxruntime_providers": providers,
        "torch": _version("torch"),
        "gpus": gpus,
        "backends": _backends(providers, gpus),
        "kernels": _kernels(),
    }


def _kernels() -> dict[str, str]:
    """NVRTC builds of the CUDA kernels, per architecture (no GPU needed)."""
    from .cuda import kernel_status

    return kernel_status()


def render(facts: dict) -> str:
    lines = [
        f"df5t-deploy {facts['df5t_deploy']}  Python {facts['python']}  {facts['platform']}",
        f"CPU: {facts['cpu']['machine']}, {facts['cpu']['cores']} cores, flags {' '.join(facts['cpu']['flags']) or '-'}",
        f"numpy {facts['numpy']}  onnxruntime {facts['onnxruntime'] or 'missing'} "
        f"({', '.join(facts['onnxruntime_providers']) or 'no providers'})  torch {facts['torch'] or 'not installed'}",
        f"GPUs: {'; '.join(facts['gpus']) or 'none seen'}",
        "backends:",
    ]
    lines += [f"  {name:<18} {state}" for name, state in facts["backends"].items()]
    lines.append("CUDA kernels (NVRTC): " + ", ".join(f"{arch} {state}" for arch, state in facts["kernels"].items()))
    return "\n".join(lines)
