"""What this machine can run, and why not: ``df5t doctor``."""

from __future__ import annotations

import importlib
import os
import platform
import shutil
import subprocess
import sys

import numpy as np

from .backends import diagnose
from .version import __version__, install_extra

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


def _device_loop(backends: dict[str, str], kernels: dict[str, str]) -> str:
    """Whether GPU backends can run the on-device loop, or why they fall back to host copies."""
    if _version("cuda.bindings") is None:
        return f"cuda-python is not installed: {install_extra('gpu')}"
    if not backends["torch-cuda"].startswith("ok"):
        return f"needs PyTorch with CUDA for its buffers: {backends['torch-cuda']}"
    failing = [arch for arch, state in kernels.items() if state != "ok"]
    return f"the kernels do not build for {', '.join(failing)}" if failing else "ok"


def collect() -> dict:
    try:
        import onnxruntime as ort

        providers = list(ort.get_available_providers())
        ort_version = ort.__version__
    except ImportError:
        providers, ort_version = [], None
    gpus = _gpus()
    backends, kernels = diagnose(gpus), _kernels()
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
        "backends": backends,
        "device_loop": _device_loop(backends, kernels),
        "kernels": kernels,
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
    lines.append(f"on-device loop: {facts['device_loop']}")
    lines.append("CUDA kernels (NVRTC): " + ", ".join(f"{arch} {state}" for arch, state in facts["kernels"].items()))
    if "selftest" in facts:
        lines.append("device loop self-check: " + ("; ".join(facts["selftest"]) or "no CUDA GPU to check"))
    return "\n".join(lines)


def selftests() -> list[str]:
    """The device loop's self-check, run afresh on every visible GPU: one verdict per GPU."""
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    from .backends.base import open_device_loop
    from .device_check import self_check

    verdicts = []
    for index in range(torch.cuda.device_count()):
        name = torch.cuda.get_device_name(index)
        device = open_device_loop(index)
        if device is None:
            verdicts.append(f"cuda:{index} {name}: not run (the device loop cannot start; see the warning)")
            continue
        verdict = self_check(device)
        state = "pass" if verdict.passed else "FAIL"
        verdicts.append(f"cuda:{index} {name}: {state}, {verdict.summary} ({verdict.details})")
    return verdicts
