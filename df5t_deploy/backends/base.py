"""What every backend provides: eps for a batch of tiles, and the artifact's description."""

from __future__ import annotations

import importlib
import warnings
from typing import Any, Protocol

import numpy as np

from ..artifact import ArtifactInfo
from ..version import install_extra


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here; the message says what is missing."""


#: What a GPU backend says when nvidia-smi lists no GPU.
NO_GPU_SEEN = "no NVIDIA GPU seen (nvidia-smi)"


def installed(module: str) -> bool:
    """Whether ``module`` imports here (any failure to import means: not usable)."""
    try:
        importlib.import_module(module)
    except Exception:
        return False
    return True


class Backend(Protocol):
    name: str  # e.g. "onnxruntime-cpu"
    info: ArtifactInfo
    preferred_batch: int  # tiles per call, chosen by measurement for this backend

    def __call__(self, x: np.ndarray, t: np.ndarray) -> np.ndarray:
        """eps [B,3,T,T] float32 for x [B,3,T,T] float32 and raw timesteps t [B] float32."""
        ...

    def close(self) -> None:
        """Release the model and its device memory; closing twice is harmless."""
        ...


class ClosingBackend:
    """Context-manager use for backends: ``with SomeBackend(...) as backend:`` closes it."""

    def close(self) -> None:  # the backends with something to release override it
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


DEVICE_LOOP_NEEDS = f"it needs PyTorch with CUDA, cuda-python and NVRTC: {install_extra('gpu')}"


def open_device_loop(index: int) -> Any | None:
    """The on-device loop's ``Device`` on GPU ``index`` (PyTorch buffers, NVRTC kernels), or
    None with a warning where its software is missing; the backend then runs the host loop
    (tiles copied to and from the GPU every step), slower but the same result."""
    try:
        from ..cuda import KernelBuildError
        from ..cuda.launch import CudaError
        from ..cuda.torch_device import TorchCudaDevice
    except ImportError as err:
        _warn_host_loop(f"{err}; {DEVICE_LOOP_NEEDS}")
        return None
    try:
        return TorchCudaDevice(index)
    except ImportError as err:
        _warn_host_loop(f"{err}; {DEVICE_LOOP_NEEDS}")
    except (KernelBuildError, CudaError) as err:
        _warn_host_loop(str(err))
    return None


def _warn_host_loop(reason: str) -> None:
    warnings.warn(f"the on-device loop cannot start ({reason}); every step goes through host copies "
                  "(slower, same result)", stacklevel=3)
