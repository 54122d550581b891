"""The CUDA kernels compiled by g++ through cuda_emulation.h, and a numpy ``Device`` on them.

Stricter than a plain call, so that what a GPU would reject fails here too:
- a launch runs the kernel once per thread of a multi-block grid, in a shuffled order;
- every launch's ctypes arguments are checked against the kernel's C signature (count,
  pointer or value, size), read from the preprocessed source;
- the device's ``capture`` records launches and device operations with their arguments
  frozen and replays them, and refuses allocations, uploads and downloads while capturing;
- ``DF5T_EMULATION_ASAN=1`` builds the library under AddressSanitizer.
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from df5t_deploy import cuda

HERE = Path(__file__).parent
HEADER = HERE / "cuda_emulation.h"
#: The emulated grid: blocks x threads per block.
BLOCKS, THREADS = 3, 4
ASAN = "DF5T_EMULATION_ASAN"
_VALUE_TYPES = {"u32": ctypes.c_uint32, "unsigned int": ctypes.c_uint32, "u64": ctypes.c_uint64,
                "int": ctypes.c_int, "float": ctypes.c_float, "double": ctypes.c_double}


def _compiler() -> str:
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("g++ is not installed: the kernels' CPU emulation needs it")
    return compiler


def build_library(folder: Path, defines: tuple[str, ...] = ()) -> ctypes.CDLL:
    """The emulation library; ``defines`` (``NAME=VALUE``) alter the source, e.g. to plant a bug."""
    sanitize = ["-fsanitize=address", "-fno-omit-frame-pointer"] if os.environ.get(ASAN) else []
    out = folder / "kernels.so"
    subprocess.run([_compiler(), "-O2", "-shared", "-fPIC", "-std=c++17", *sanitize, *(f"-D{d}" for d in defines),
                    "-include", str(HEADER), "-x", "c++", str(cuda.SOURCE_PATH), "-o", str(out)], check=True)
    return ctypes.CDLL(str(out))


@functools.lru_cache(maxsize=1)
def kernel_signatures() -> dict[str, list[type]]:
    """Each kernel's parameters as ctypes types (c_void_p for every pointer), from the source
    preprocessed as the emulation compiles it (macros expanded)."""
    text = subprocess.run([_compiler(), "-E", "-P", "-std=c++17", "-include", str(HEADER), "-x", "c++",
                           str(cuda.SOURCE_PATH)], check=True, capture_output=True, text=True).stdout
    signatures = {}
    for name, params in re.findall(r'extern "C" void (df5t_\w+)\(([^)]*)\)', text):
        if name in cuda.KERNELS:
            signatures[name] = [_ctype(param) for param in params.split(",")]
    missing = set(cuda.KERNELS) - set(signatures)
    assert not missing, f"kernels without a parsed signature: {missing}"
    return signatures


def _ctype(param: str) -> type:
    declaration = " ".join(param.split())
    if "*" in declaration:
        return ctypes.c_void_p
    kind = declaration.removeprefix("const ").rsplit(" ", 1)[0]
    return _VALUE_TYPES[kind]


def check_arguments(name: str, args) -> None:
    """A launch's ctypes arguments against the kernel's signature: what cuLaunchKernel would
    read wrongly (a missing argument, an int where a pointer goes, 32 bits for 64) fails here."""
    expected = kernel_signatures()[name]
    assert len(args) == len(expected), f"{name} takes {len(expected)} arguments, {len(args)} given"
    for index, (arg, kind) in enumerate(zip(args, expected, strict=True)):
        assert type(arg) is kind, f"{name} argument {index}: {type(arg).__name__} given, {kind.__name__} expected"


class EmulatedKernels:
    """Calls a kernel on host arrays (converted to pointers) and ctypes scalars."""

    def __init__(self, library: ctypes.CDLL, seed: int = 0):
        self.library = library
        self._order = np.random.default_rng(seed)

    def __call__(self, name: str, *args) -> None:
        for a in args:
            assert not isinstance(a, np.ndarray) or a.flags.c_contiguous
        converted = [ctypes.c_void_p(a.ctypes.data) if isinstance(a, np.ndarray) else a for a in args]
        self.launch(name, converted)

    def launch(self, name: str, args) -> None:
        """One thread of a BLOCKS x THREADS grid after another, in a shuffled order."""
        check_arguments(name, args)
        kernel = getattr(self.library, name)
        for thread in self._order.permutation(BLOCKS * THREADS):
            self.library.df5t_emu_set_thread(ctypes.c_uint64(int(thread)), ctypes.c_uint64(BLOCKS * THREADS))
            kernel(*args)


class _Finished:
    """A marker or download of work that has already run."""

    def __init__(self, value):
        self.value = value

    def synchronize(self):
        pass

    def result(self):
        return self.value


class CaptureError(RuntimeError):
    """Something a CUDA graph capture cannot hold was done while capturing."""


class EmulatedDevice:
    """device_loop.Device on host memory: numpy buffers, kernels run by the emulation, and
    graph capture emulated: recorded with frozen arguments, replayed later."""

    def __init__(self, library: ctypes.CDLL):
        self.kernels = EmulatedKernels(library)
        self.launches: list[str] = []
        self._recording: list | None = None

    def identity(self) -> dict:
        return {"device": "emulated", "library": self.kernels.library._name}

    def bind_thread(self):
        pass  # one host device

    def _not_while_capturing(self, what: str) -> None:
        if self._recording is not None:
            raise CaptureError(f"{what} while capturing a graph: a replay would not repeat it")

    def empty(self, shape, dtype):
        self._not_while_capturing("allocation")
        return np.full(shape, np.nan if np.dtype(dtype).kind == "f" else 0, dtype=dtype)  # poisoned

    def upload(self, array):
        self._not_while_capturing("upload")
        return np.array(array, copy=True, order="C")

    def _device_op(self, operation) -> None:
        if self._recording is not None:
            self._recording.append(operation)
        else:
            operation()

    def zero(self, buffer):
        self._device_op(functools.partial(buffer.fill, 0))

    def copy(self, destination, source):
        self._device_op(functools.partial(np.copyto, destination, source))

    def transform(self, out, a, left, right):
        def run():
            out[...] = left @ a @ right.T

        self._device_op(run)

    def run_network(self, network, tiles, eps_tiles, t) -> None:
        self._device_op(functools.partial(network, tiles, eps_tiles, t))

    def capture(self, step):
        """Record ``step`` (it does not run now) and return its replay, which repeats the
        recorded work with the arguments it had when recorded, as a CUDA graph does."""
        self._not_while_capturing("nested capture")
        self._recording = []
        try:
            step()
            recorded = self._recording
        finally:
            self._recording = None

        def replay():
            for operation in recorded:
                operation()

        return replay

    def marker(self):
        return _Finished(None)  # work runs as it is queued

    def download_async(self, buffer):
        self._not_while_capturing("download")
        return _Finished(np.array(buffer, copy=True))

    def pointer(self, buffer):
        return ctypes.c_void_p(buffer.ctypes.data)

    def launch(self, name, *args):
        check_arguments(name, args)
        frozen = [type(a)(a.value) for a in args]  # as cuLaunchKernel copies them into the graph
        self._device_op(functools.partial(self._run, name, frozen))

    def _run(self, name, args) -> None:
        self.launches.append(name)
        self.kernels.launch(name, args)
