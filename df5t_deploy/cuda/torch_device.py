"""device_loop.Device on a GPU: PyTorch tensors as buffers, the NVRTC kernels launched on
PyTorch's current stream (also while it captures a CUDA graph), so kernels and the network
are ordered without host syncs.

Host transfers go through pinned memory: uploads are queued on the compute stream (the host
does not wait), downloads on a separate copy stream behind an event, so a result is copied
out while the next walk already computes.
"""

from __future__ import annotations

import ctypes
import threading

import numpy as np

from .launch import CudaKernels

#: PyTorch allows one graph capture at a time per process; workers on several GPUs take turns.
_CAPTURE_LOCK = threading.Lock()


class TorchCudaDevice:
    def __init__(self, index: int = 0):
        import torch

        self.torch = torch
        self.device = torch.device("cuda", index)
        with torch.cuda.device(self.device):
            torch.cuda.init()
            self.kernels = CudaKernels(index)
            self.copy_stream = torch.cuda.Stream(self.device)
            self.capture_stream = torch.cuda.Stream(self.device)
        self._dtypes = {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16,
                        np.dtype(np.int32): torch.int32, np.dtype(np.uint8): torch.uint8}

    def bind_thread(self) -> None:
        """Make this GPU the calling thread's current device (each worker of a multi-GPU run
        calls it): graph captures and PyTorch's own launches follow the current device."""
        self.torch.cuda.set_device(self.device)

    def _compute_stream(self):
        return self.torch.cuda.current_stream(self.device)

    def empty(self, shape, dtype):
        return self.torch.empty(shape, dtype=self._dtypes[np.dtype(dtype)], device=self.device)

    def upload(self, array: np.ndarray):
        """A device copy of ``array``, queued from pinned memory; the host does not wait for it
        (PyTorch keeps the pinned block until the copy has run)."""
        pinned = self.torch.from_numpy(np.ascontiguousarray(array)).pin_memory()
        return pinned.to(self.device, non_blocking=True)

    def download_async(self, buffer) -> PinnedDownload:
        torch = self.torch
        host = torch.empty(buffer.shape, dtype=buffer.dtype, pin_memory=True)
        self.copy_stream.wait_stream(self._compute_stream())
        with torch.cuda.stream(self.copy_stream):
            host.copy_(buffer, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.copy_stream)
        buffer.record_stream(self.copy_stream)  # not reused before the copy stream is past it
        return PinnedDownload(host, done)

    def marker(self):
        event = self.torch.cuda.Event()
        event.record(self._compute_stream())
        return event  # .synchronize() waits for it

    def zero(self, buffer) -> None:
        buffer.zero_()

    def copy(self, destination, source) -> None:
        destination.copy_(source)

    def transform(self, out, a, left, right) -> None:
        out.copy_(self.torch.matmul(self.torch.matmul(left, a), right.T))

    def capture(self, step):
        """Record ``step`` as a CUDA graph and return its replay.

        Captured on a side stream (as PyTorch requires) that first waits for the compute
        stream; unlike ``torch.cuda.graph`` this does not synchronise the whole device, so the
        walk queued before keeps the GPU busy while the host captures. Every buffer ``step``
        touches was allocated before, so replays reuse them; the network's temporaries live in
        the graph's private pool.
        """
        torch = self.torch
        graph = torch.cuda.CUDAGraph()
        compute = self._compute_stream()
        self.capture_stream.wait_stream(compute)
        with _CAPTURE_LOCK, torch.cuda.stream(self.capture_stream):
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                step()
            finally:
                graph.capture_end()
        compute.wait_stream(self.capture_stream)
        return graph.replay

    def run_network(self, network, tiles, eps_tiles, t) -> None:
        network(tiles, eps_tiles, t)  # PyTorch or TensorRT enqueue on the current stream

    def identity(self) -> dict:
        torch = self.torch
        properties = torch.cuda.get_device_properties(self.device)
        return {"gpu": properties.name, "compute_capability": f"{properties.major}.{properties.minor}",
                "driver": self.kernels.driver_version, "cuda_runtime": torch.version.cuda, "arch": self.kernels.arch}

    def pointer(self, buffer) -> ctypes.c_void_p:
        return ctypes.c_void_p(buffer.data_ptr())

    def launch(self, name: str, *args) -> None:
        self.kernels.launch(name, args, self._compute_stream().cuda_stream)


class PinnedDownload:
    """A device-to-host copy in flight into pinned memory."""

    def __init__(self, host, done):
        self._host, self._done = host, done

    def result(self) -> np.ndarray:
        self._done.synchronize()
        return self._host.numpy()  # the array keeps the pinned tensor alive
