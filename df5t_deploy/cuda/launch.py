"""Loading the kernels into a GPU's context and launching them, every driver call checked.

Kernels are grid-stride loops, so any grid covers any size: a launch uses a few blocks per
multiprocessor. Arguments are ctypes objects (c_void_p for device pointers, c_uint32,
c_uint64, c_float, c_int, c_double), passed to cuLaunchKernel as an array
of their addresses.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from contextlib import contextmanager

from . import KERNELS, KernelBuildError, compile_cubin
from .status import checked

THREADS_PER_BLOCK = 256
BLOCKS_PER_SM = 8


class CudaError(RuntimeError):
    pass


def _check(result, what: str):
    return checked(result, what, CudaError)


class CudaKernels:
    """The df5t kernels in the primary context of one device (the one PyTorch uses too).

    Built for the device's own compute capability (NVRTC permitting; otherwise
    ``KernelBuildError``, and the caller runs the host loop). Each launch binds this
    device's context: with several GPUs, PyTorch's device guards may have made another
    one current in this thread.
    """

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
        self.driver_version = _check(driver.cuDriverGetVersion(), "cuDriverGetVersion")
        cubin = compile_cubin(self.arch)  # KernelBuildError where NVRTC cannot target this GPU
        self.context = _check(driver.cuDevicePrimaryCtxRetain(handle), "cuDevicePrimaryCtxRetain")
        with self._bound():
            try:
                self.module = _check(driver.cuModuleLoadData(cubin), "cuModuleLoadData")
            except CudaError as err:  # e.g. a driver older than the NVRTC that built the cubin
                raise KernelBuildError(f"the {self.arch} kernels do not load on this GPU: {err}") from None
            self.functions = {
                name: _check(driver.cuModuleGetFunction(self.module, name.encode()), f"cuModuleGetFunction({name})")
                for name in KERNELS
            }

    @contextmanager
    def _bound(self):
        """This device's context current in this thread for the block, the caller's after it."""
        driver = self._driver
        current = _check(driver.cuCtxGetCurrent(), "cuCtxGetCurrent")
        if int(current) == int(self.context):
            yield
            return
        _check(driver.cuCtxPushCurrent(self.context), "cuCtxPushCurrent")
        try:
            yield
        finally:
            _check(driver.cuCtxPopCurrent(), "cuCtxPopCurrent")

    def launch(self, name: str, args: Sequence[ctypes._SimpleCData | ctypes.Structure], stream: int = 0) -> None:
        """Launch kernel ``name`` on ``stream`` (a CUstream handle of this device, 0 for the
        default stream)."""
        driver = self._driver
        pointers = (ctypes.c_void_p * len(args))(*[ctypes.addressof(a) for a in args])
        blocks = self.sm_count * BLOCKS_PER_SM
        with self._bound():
            _check(driver.cuLaunchKernel(self.functions[name], blocks, 1, 1, THREADS_PER_BLOCK, 1, 1, 0,
                                         driver.CUstream(stream), ctypes.addressof(pointers), 0), f"launch {name}")

    def synchronize(self, stream: int = 0) -> None:
        with self._bound():
            _check(self._driver.cuStreamSynchronize(self._driver.CUstream(stream)), "cuStreamSynchronize")
