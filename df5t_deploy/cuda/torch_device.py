"""device_loop.Device on a GPU: PyTorch tensors as buffers, the NVRTC kernels launched on
PyTorch's current stream (also while it captures a CUDA graph), so kernels and the network
are ordered without host syncs."""

from __future__ import annotations

import ctypes

import numpy as np

from .launch import CudaKernels


class TorchCudaDevice:
    def __init__(self, index: int = 0):
        import torch

        self.torch = torch
        self.device = torch.device("cuda", index)
        with torch.cuda.device(self.device):
            torch.cuda.init()
            self.kernels = CudaKernels(index)
        self._dtypes = {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16,
                        np.dtype(np.int32): torch.int32, np.dtype(np.uint8): torch.uint8}

    def empty(self, shape, dtype):
        return self.torch.empty(shape, dtype=self._dtypes[np.dtype(dtype)], device=self.device)

    def upload(self, array: np.ndarray):
        return self.torch.from_numpy(np.ascontiguousarray(array)).to(self.device, non_blocking=False)

    def download(self, buffer) -> np.ndarray:
        return buffer.cpu().numpy()

    def zero(self, buffer) -> None:
        buffer.zero_()

    def copy(self, destination, source) -> None:
        destination.copy_(source)

    def transform(self, out, a, left, right) -> None:
        out.copy_(self.torch.matmul(self.torch.matmul(left, a), right.T))

    def capture(self, step):
        """Record ``step`` as a CUDA graph (on a side stream, as PyTorch requires) and return
        its replay; every buffer it touches was allocated before, so replays reuse them."""
        torch = self.torch
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        return graph.replay
    def pointer(self, buffer) -> ctypes.c_void_p:
        return ctypes.c_void_p(buffer.data_ptr())

    def launch(self, name: str, *args) -> None:
        self.kernels.launch(name, args, self.torch.cuda.current_stream(self.device).cuda_stream)
