"""The TensorRT backend: deserialise a cached plan, bind device buffers, run on a stream.

Every CUDA runtime call's status is checked (``_ok``); TensorRT calls that report failure by
their return value (deserialisation, shape setting, binding, execution) are checked too.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..artifact import ArtifactInfo
from ..cuda.status import checked
from ..engines.build import artifact_facts, build_engine, choose_profile
from ..engines.cache import EngineCache
from ..version import install_extra
from .base import (
    NO_GPU_SEEN,
    BackendUnavailable,
    ClosingBackend,
    installed,
    open_device_loop,
)

#: Chunk bindings kept for reuse: two walks may be in flight, each with its own buffers.
KEPT_BINDINGS = 4


class TensorRTError(RuntimeError):
    pass


def _ok(result, what: str):
    return checked(result, what, TensorRTError)


class TensorRTBackend(ClosingBackend):
    name = "tensorrt"

    def __init__(self, model: str | Path, device: str = "cuda", max_batch: int | None = None,
                 cache: EngineCache | None = None):
        try:
            import tensorrt as trt
            from cuda.bindings import runtime as cudart
        except ImportError as err:
            raise BackendUnavailable(f"TensorRT backend needs tensorrt and cuda-python ({err.name} missing)") from None
        self._cudart = cudart
        self.device = int(device.partition(":")[2] or 0)
        _ok(cudart.cudaSetDevice(self.device), f"cudaSetDevice({self.device})")
        facts = artifact_facts(model)
        self.info: ArtifactInfo = facts.info
        profile = choose_profile(max_batch)
        plan = build_engine(model, cache or EngineCache(), profile, device=self.device)
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self._runtime.deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise TensorRTError(f"{plan}: TensorRT could not deserialise the plan (delete it to rebuild)")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise TensorRTError("TensorRT could not create an execution context")
        self.preferred_batch = profile.opt
        self.max_batch = profile.max
        self._x_dtype = np.float16 if facts.info.precision == "fp16" else np.float32
        self.stream = _ok(cudart.cudaStreamCreate(), "cudaStreamCreate")
        tile = facts.info.tile
        itemsize = np.dtype(self._x_dtype).itemsize
        self._bytes = {"x": profile.max * 3 * tile * tile * itemsize, "t": profile.max * 4,
                       "eps": profile.max * 3 * tile * tile * itemsize}
        self._buffers = {name: _ok(cudart.cudaMalloc(size), f"cudaMalloc({name})") for name, size in self._bytes.items()}
        self._chunk_contexts: dict[tuple, ChunkContexts] = {}
        self._scratch_tensor = None

    def __call__(self, x: np.ndarray, t: np.ndarray) -> np.ndarray:
        cudart = self._cudart
        batch = len(x)
        if batch > self.max_batch:
            raise TensorRTError(f"batch {batch} exceeds the engine profile's maximum {self.max_batch}")
        x = np.ascontiguousarray(x, dtype=self._x_dtype)
        t = np.ascontiguousarray(t, dtype=np.float32)
        eps = np.empty_like(x)
        if not self.context.set_input_shape("x", x.shape) or not self.context.set_input_shape("t", t.shape):
            raise TensorRTError(f"TensorRT rejected input shapes {x.shape}, {t.shape}")
        for name, pointer in self._buffers.items():  # device_network may have bound other tensors
            if not self.context.set_tensor_address(name, int(pointer)):
                raise TensorRTError(f"set_tensor_address({name}) failed")
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        _ok(cudart.cudaMemcpyAsync(self._buffers["x"], x.ctypes.data, x.nbytes, h2d, self.stream), "copy x")
        _ok(cudart.cudaMemcpyAsync(self._buffers["t"], t.ctypes.data, t.nbytes, h2d, self.stream), "copy t")
        if not self.context.execute_async_v3(int(self.stream)):
            raise TensorRTError("execute_async_v3 failed")
        _ok(cudart.cudaMemcpyAsync(eps.ctypes.data, self._buffers["eps"], eps.nbytes, d2h, self.stream), "copy eps")
        _ok(cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        return eps.astype(np.float32, copy=False)

    @functools.cached_property
    def device_api(self):
        """The device loop on this GPU (None: tiles go through host copies, ``__call__``)."""
        return open_device_loop(self.device)

    def device_network(self, tiles, eps_tiles, t) -> None:
        """Run the engine on device tiles in place, enqueued on PyTorch's current stream
        (capturable in a CUDA graph): one execution context per chunk of the batch, bound
        the first time these buffers are seen (``ChunkContexts``)."""
        import torch

        key = (tiles.data_ptr(), eps_tiles.data_ptr(), t.data_ptr(), len(tiles))
        chunks = self._chunk_contexts.pop(key, None)
        if chunks is None:
            chunks = ChunkContexts(self._create_user_managed_context, self._scratch(), tiles, eps_tiles, t,
                                   self.max_batch)
        self._chunk_contexts[key] = chunks  # most recent last
        while len(self._chunk_contexts) > KEPT_BINDINGS:  # walks in flight keep theirs
            self._chunk_contexts.pop(next(iter(self._chunk_contexts)))
        chunks.enqueue(torch.cuda.current_stream(self.device).cuda_stream)

    def _create_user_managed_context(self):
        import tensorrt as trt

        context = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if context is None:
            raise TensorRTError("TensorRT could not create an execution context")
        return context

    def _scratch(self):
        """One activation scratch for every chunk context (they run one after another)."""
        import torch

        if self._scratch_tensor is None:
            size = max(1, self.engine.device_memory_size_v2)
            self._scratch_tensor = torch.empty(size, dtype=torch.uint8, device=f"cuda:{self.device}")
        return self._scratch_tensor

    def close(self) -> None:
        """Free the bindings' buffers and the stream (once; the engine goes with the object)."""
        if self.stream is None:
            return
        for pointer in self._buffers.values():
            _ok(self._cudart.cudaFree(pointer), "cudaFree")
        self._buffers, self._chunk_contexts = {}, {}
        _ok(self._cudart.cudaStreamDestroy(self.stream), "cudaStreamDestroy")
        self.stream = None


#: TensorRT requires every bound tensor address to be aligned to 256 bytes.
TENSOR_ALIGNMENT = 256


class ChunkContexts:
    """Execution contexts for device tiles in chunks of at most ``max_batch`` tiles.

    Each chunk has its own context whose input shapes and tensor addresses are set once,
    here; enqueueing then changes nothing, so a CUDA graph can capture it (TensorRT needs an
    enqueue after any shape change before a capture, which the device loop's first, direct
    step provides). The contexts share one scratch allocation: they run one after another on
    one stream. A chunk's slice of the caller's buffers is bound where it is 256-byte
    aligned (the tiles usually are); otherwise (the timesteps of a later chunk, say) the
    chunk gets its own buffer, filled before and emptied after its enqueue on the same stream.
    """

    def __init__(self, create_context: Callable[[], Any], scratch, tiles, eps_tiles, t, max_batch: int):
        self.contexts = []
        self._copies_in: list[list[tuple[Any, Any]]] = []  # per chunk: (own buffer, caller's slice)
        self._copies_out: list[list[tuple[Any, Any]]] = []  # per chunk: (caller's slice, own buffer)
        for start in range(0, len(tiles), max_batch):
            stop = min(len(tiles), start + max_batch)
            context = create_context()
            context.set_device_memory(scratch.data_ptr(), scratch.numel() * scratch.element_size())
            if not context.set_input_shape("x", tuple(tiles[start:stop].shape)) or \
                    not context.set_input_shape("t", (stop - start,)):
                raise TensorRTError(f"TensorRT rejected a batch of {stop - start} tiles")
            copies_in, copies_out = [], []
            for name, whole, copies in (("x", tiles, copies_in), ("t", t, copies_in), ("eps", eps_tiles, copies_out)):
                bound = _aligned(whole[start:stop], copies, outgoing=name == "eps")
                if not context.set_tensor_address(name, bound.data_ptr()):
                    raise TensorRTError(f"set_tensor_address({name}) failed")
            self.contexts.append(context)
            self._copies_in.append(copies_in)
            self._copies_out.append(copies_out)

    def enqueue(self, stream: int) -> None:
        """Run every chunk on ``stream`` (PyTorch's current stream: the copies go there too)."""
        for context, copies_in, copies_out in zip(self.contexts, self._copies_in, self._copies_out, strict=True):
            for destination, source in copies_in:
                destination.copy_(source)
            if not context.execute_async_v3(stream):
                raise TensorRTError("execute_async_v3 failed")
            for destination, source in copies_out:
                destination.copy_(source)


def _aligned(view, copies: list, outgoing: bool):
    """``view`` if TensorRT may bind it, else a fresh (aligned) buffer of its shape, recorded
    in ``copies`` as (destination, source) of the copy that keeps the two in step."""
    if view.data_ptr() % TENSOR_ALIGNMENT == 0:
        return view
    import torch

    own = torch.empty_like(view, memory_format=torch.contiguous_format)
    copies.append((view, own) if outgoing else (own, view))
    return own


def open_kind(kind: str, model: Path, device: str, threads: int | None) -> TensorRTBackend:
    if model.suffix.lower() != ".onnx":
        raise BackendUnavailable("TensorRT builds engines from ONNX artifacts; export the checkpoint first")
    return TensorRTBackend(model, device=device)


def diagnose(kind: str, gpus: list[str]) -> str:
    missing = [name for name in ("tensorrt", "cuda.bindings") if not installed(name)]
    if missing:
        return f"{' and '.join(missing)} not installed (and an NVIDIA driver needed): {install_extra('gpu')}"
    return "ok" if gpus else NO_GPU_SEEN
