"""The CUDA kernels compiled by g++ through cuda_emulation.h, and a numpy ``Device`` on them."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from df5t_deploy import cuda

HERE = Path(__file__).parent


def build_library(folder: Path) -> ctypes.CDLL:
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("g++ is not installed: the kernels' CPU emulation needs it")
    out = folder / "kernels.so"
    subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-std=c++17", "-include", str(HERE / "cuda_emulation.h"),
                    "-x", "c++", str(cuda.SOURCE_PATH), "-o", str(out)], check=True)
    return ctypes.CDLL(str(out))


class EmulatedKernels:
    """Calls a kernel on host arrays (converted to pointers) and ctypes scalars."""

    def __init__(self, library: ctypes.CDLL):
        self.library = library

    def __call__(self, name: str, *args) -> None:
        for a in args:
            assert not isinstance(a, np.ndarray) or a.flags.c_contiguous
        converted = [ctypes.c_void_p(a.ctypes.data) if isinstance(a, np.ndarray) else a for a in args]
        getattr(self.library, name)(*converted)


class _Finished:
    """A marker or download of work that has already run."""

    def __init__(self, value):
        self.value = value

    def synchronize(self):
        pass

    def result(self):
        return self.value


class EmulatedDevice:
    """device_loop.Device on host memory: numpy buffers, kernels run by the emulation."""

    def __init__(self, library: ctypes.CDLL):
        self.library = library
        self.launches: list[str] = []

    def bind_thread(self):
        pass  # one host device

    def empty(self, shape, dtype):
        return np.full(shape, np.nan if np.dtype(dtype).kind == "f" else 0, dtype=dtype)  # poisoned

    def upload(self, array):
        return np.array(array, copy=True, order="C")

    def zero(self, buffer):
        buffer[...] = 0

    def copy(self, destination, source):
        destination[...] = source

    def capture(self, step):
        return step  # no graphs on the CPU: replaying is calling

    def marker(self):
        return _Finished(None)  # work runs as it is queued

    def download_async(self, buffer):
        return _Finished(np.array(buffer, copy=True))

    def transform(self, out, a, left, right):
        out[...] = left @ a @ right.T

    def pointer(self, buffer):
        return ctypes.c_void_p(buffer.ctypes.data)

    def launch(self, name, *args):
        self.launches.append(name)
        getattr(self.library, name)(*args)
