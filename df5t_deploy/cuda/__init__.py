"""CUDA kernels: their source, and their NVRTC build for each GPU architecture, cached.

NVRTC needs no GPU, so every machine can check that the kernels compile (``df5t doctor``
reports it); launching them needs a GPU (``df5t_deploy.backends`` on CUDA).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ..files import cache_root
from .status import checked

SOURCE_PATH = Path(__file__).with_name("kernels.cu")
#: The architectures ``df5t doctor`` and the tests build for without a GPU (a GPU's kernels are
#: built for its own compute capability, whatever it is, where NVRTC supports it).
ARCHITECTURES = ("sm_80", "sm_86", "sm_89", "sm_90", "sm_100", "sm_120")
KERNELS = (
    "df5t_advance",
    "df5t_fill_timesteps",
    "df5t_ddrm_step_pointwise",
    "df5t_ddrm_step_block",
    "df5t_ddrm_split",
    "df5t_ddrm_update",
    "df5t_ddrm_merge",
    "df5t_gather_tiles_f32",
    "df5t_gather_tiles_f16",
    "df5t_blend_tiles_f32",
    "df5t_blend_tiles_f16",
    "df5t_state_to_grey",
)
# Precise math: the kernels must match their numpy twins (no --use_fast_math).
NVRTC_OPTIONS = ("-std=c++17",)


class KernelBuildError(RuntimeError):
    """NVRTC failed; the message holds its log."""


def kernel_source() -> str:
    return SOURCE_PATH.read_text()


def cache_dir() -> Path:
    return cache_root() / "kernels"


def _nvrtc():
    try:
        from cuda.bindings import nvrtc
    except ImportError as err:
        raise KernelBuildError("cuda-python is not installed: pip install cuda-bindings nvidia-cuda-nvrtc") from err
    return nvrtc


def _check(nvrtc, result, what: str, program=None) -> None:
    try:
        checked(result, f"NVRTC {what}", KernelBuildError)
    except KernelBuildError as err:  # with the compiler's log, where there is one
        log = _log(nvrtc, program) if program is not None else ""
        raise KernelBuildError(f"{err}\n{log}") from None


def _log(nvrtc, program) -> str:
    status, size = nvrtc.nvrtcGetProgramLogSize(program)
    if int(status) != 0 or size <= 1:
        return ""
    buffer = b" " * size
    nvrtc.nvrtcGetProgramLog(program, buffer)
    return buffer.decode(errors="replace").rstrip("\x00 \n")


def _query(what: str, call):
    """The value of an NVRTC query; cuda-bindings loads libnvrtc on the first call, and a
    library it cannot find or load is a KernelBuildError too."""
    nvrtc = _nvrtc()
    try:
        result = call(nvrtc)
    except RuntimeError as err:
        raise KernelBuildError(f"NVRTC cannot be loaded ({err}): pip install nvidia-cuda-nvrtc") from err
    _check(nvrtc, result, what)
    return result[1:]


def nvrtc_version() -> str:
    major, minor = _query("version", lambda nvrtc: nvrtc.nvrtcVersion())
    return f"{major}.{minor}"


def nvrtc_architectures() -> tuple[str, ...]:
    """The architectures this NVRTC can build for (``sm_XY``)."""
    (values,) = _query("supported architectures", lambda nvrtc: nvrtc.nvrtcGetSupportedArchs())
    return tuple(f"sm_{value}" for value in values)


def compile_cubin(arch: str) -> bytes:
    """The kernels' cubin for ``arch`` (e.g. "sm_90": a GPU's own compute capability), from
    the cache or NVRTC; ``KernelBuildError`` where this NVRTC cannot build for it."""
    supported = nvrtc_architectures()
    if arch not in supported:
        raise KernelBuildError(f"this NVRTC ({nvrtc_version()}) cannot build for {arch}; it supports "
                               f"{', '.join(supported)}: upgrade nvidia-cuda-nvrtc")
    source = kernel_source().encode()
    key = hashlib.sha256(source + arch.encode() + nvrtc_version().encode() + repr(NVRTC_OPTIONS).encode()).hexdigest()[:16]
    cached = cache_dir() / f"{key}-{arch}.cubin"
    if cached.is_file():
        return cached.read_bytes()
    cubin = _build(source, arch)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(cached.name + f".{os.getpid()}.partial")
    tmp.write_bytes(cubin)
    os.replace(tmp, cached)
    return cubin


def _build(source: bytes, arch: str, extra_options: tuple[str, ...] = ()) -> bytes:
    return _compile(source, arch, extra_options)[0]


def _compile(source: bytes, arch: str, extra_options: tuple[str, ...] = ()) -> tuple[bytes, str]:
    """The cubin and NVRTC's log."""
    nvrtc = _nvrtc()
    result = nvrtc.nvrtcCreateProgram(source, b"kernels.cu", 0, [], [])
    _check(nvrtc, result, "program creation")
    program = result[1]
    try:
        options = [f"--gpu-architecture={arch}".encode(), *(o.encode() for o in (*NVRTC_OPTIONS, *extra_options))]
        _check(nvrtc, nvrtc.nvrtcCompileProgram(program, len(options), options), f"compilation for {arch}", program)
        result = nvrtc.nvrtcGetCUBINSize(program)
        _check(nvrtc, result, "cubin size")
        cubin = b" " * result[1]
        _check(nvrtc, nvrtc.nvrtcGetCUBIN(program, cubin), "cubin")
        return cubin, _log(nvrtc, program)
    finally:
        nvrtc.nvrtcDestroyProgram(program)


@dataclass(frozen=True)
class KernelResources:
    """What ptxas reports for one kernel: per-thread stack, spills and registers."""

    stack_bytes: int
    spill_store_bytes: int
    spill_load_bytes: int
    registers: int


# ptxas -v: for each entry function, its properties line, then "Used N registers" (helper
# functions such as the double-precision trig slow path report properties but no registers).
_PTXAS_ENTRY = re.compile(r"Function properties for (\w+)\n[^\n]*?(\d+) bytes stack frame, (\d+) bytes spill stores, "
                          r"(\d+) bytes spill loads\n[^\n]*Used (\d+) registers")


def kernel_resources(arch: str) -> dict[str, KernelResources]:
    """ptxas's resource report per kernel for ``arch`` (a fresh build with ``-v``)."""
    _, log = _compile(kernel_source().encode(), arch, ("--ptxas-options=-v",))
    return {name: KernelResources(*map(int, numbers)) for name, *numbers in _PTXAS_ENTRY.findall(log)}


@lru_cache(maxsize=1)
def kernel_status() -> dict[str, str]:
    """For ``df5t doctor``: "ok" or the reason, per architecture."""
    status = {}
    for arch in ARCHITECTURES:
        try:
            compile_cubin(arch)
            status[arch] = "ok"
        except KernelBuildError as err:
            status[arch] = str(err).splitlines()[0]
    return status
