"""Loading the kernels into a GPU's context and launching them, every driver call checked.

Kernels are grid-stride loops, so any grid covers any size: a launch uses a few blocks per
multiprocessor. Arguments are ctypes objects (c_void_p for device pointers, c_uint32,
c_uint64, c_float, c_int, c_double), passed to cuLaunchKernel as an array
of their addresses.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

from . import ARCHITECTURES, KERNELS, compile_cubin

THREADS_PER_BLOCK = 256
BLOCKS_PER_SM = 8


class CudaError(RuntimeError):
    pass


def _check(result, what: str):
    from cuda.bindings import driver

    err, *values = result if isinstance(result, tuple) else (result,)
    if err != driver.CUresult.CUDA_SUCCESS:
        raise CudaError(f"{what} failed: {err.name}")
    return values[0] if len(values) == 1 else values


class CudaKernels:
    """The df5t kernels in the primary context of one device (the one PyTorch uses too)."""

    def __init__(self, device: int = 0):
        from cuda.bindings import driver

        self._driver = driver
        _check(driver.cuInit(0), "cuInit")
        handle = _check(driver.cuDeviceGet(device), f"cuDeviceGet({device})")
        attribute = driver.CUdevice_attribute
        major = _check(driver.cuDeviceGetAttribute(attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, handle), "cc major")
        minor = _check(driver.cuDeviceGetAttribute(attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, handle), "cc minor")
        self.sm_count = _check(driver.cuDeviceGetAttribute(attribute.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, handle), "SM count")
        self.arch = f"sm_{major}{minor}"
        if self.arch not in ARCHITECTURES:
            raise CudaError(f"GPU architecture {self.arch} is not among the supported {', '.join(ARCHITECTURES)}")
        context = _check(driver.cuDevicePrimaryCtxRetain(handle), "cuDevicePrimaryCtxRetain")
        _check(driver.cuCtxSetCurrent(context), "cuCtxSetCurrent")
        self.module = _check(driver.cuModuleLoadData(compile_cubin(self.arch)), "cuModuleLoadData")
        self.functions = {
            name: _check(driver.cuModuleGetFunction(self.module, name.encode()), f"cuModuleGetFunction({name})")
            for name in KERNELS
        }

    def launch(self, name: str, args: Sequence[ctypes._SimpleCData | ctypes.Structure], stream: int = 0) -> None:
        """Launch kernel ``name`` on ``stream`` (a CUstream handle, 0 for the default stream)."""
        driver = self._driver
        pointers = (ctypes.c_void_p * len(args))(*[ctypes.addressof(a) for a in args])
        blocks = self.sm_count * BLOCKS_PER_SM
        _check(driver.cuLaunchKernel(self.functions[name], blocks, 1, 1, THREADS_PER_BLOCK, 1, 1, 0,
                                     driver.CUstream(stream), ctypes.addressof(pointers), 0), f"launch {name}")

    def synchronize(self, stream: int = 0) -> None:
        _check(self._driver.cuStreamSynchronize(self._driver.CUstream(stream)), "cuStreamSynchronize")
