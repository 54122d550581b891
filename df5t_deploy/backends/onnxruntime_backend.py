"""onnxruntime backend: the CPU reference path, and the CUDA provider with I/O binding."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..artifact import ArtifactInfo, read_artifact
from .base import NO_GPU_SEEN, BackendUnavailable, ClosingBackend

#: Tiles per call on the CPU provider, by the artifact's tile, measured on 2 cores. Large tiles:
#: benchmarks/throughput.py (df5t-512, tile 256) gave 1.73 s/tile at batch 1 and 1.68 s/tile at
#: batch 4, the same within run-to-run noise, so batch 1, which holds a quarter of the
#: activations. Small tiles pay per call: df5t-tiny-em (1.1 M parameters, tile 64) took 21.4 ms/tile at
#: batch 1, 13.2 at 4 and 11.8 at 16, and a 256 x 256 restoration at 10 steps 3.6-4.8 s at batch 1,
#: 3.1 s at 4 (4 wastes less on the padded last call than 16).
CPU_SMALL_TILE, CPU_SMALL_TILE_BATCH, CPU_BATCH = 128, 4, 1
CUDA_BATCH = 8


def cpu_batch(tile: int) -> int:
    """Tiles per call on the CPU provider for an artifact of this tile size."""
    return CPU_SMALL_TILE_BATCH if tile <= CPU_SMALL_TILE else CPU_BATCH


class OnnxRuntimeBackend(ClosingBackend):
    def __init__(self, model: str | Path, device: str = "cpu", threads: int | None = None):
        import onnxruntime as ort

        self.path = Path(model)
        providers = self._providers(ort, device)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        except Exception as err:  # onnxruntime raises its own exception types for bad files
            raise ValueError(f"{self.path}: onnxruntime cannot load it: {err}") from None
        self.info: ArtifactInfo = read_artifact(self.path)[0]
        self._x_dtype = np.float16 if self.info.precision == "fp16" else np.float32
        self.on_gpu = providers[0] == "CUDAExecutionProvider"
        self.name = "onnxruntime-cuda" if self.on_gpu else "onnxruntime-cpu"
        self.preferred_batch = CUDA_BATCH if self.on_gpu else cpu_batch(self.info.tile)
        self._device_id = int(device.partition(":")[2] or 0) if self.on_gpu else 0

    @staticmethod
    def _providers(ort, device: str) -> list:
        if device == "cpu":
            return ["CPUExecutionProvider"]
        if not device.startswith("cuda"):
            raise ValueError(f"unknown device {device!r}: use cpu or cuda[:N]")
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise BackendUnavailable(
                "onnxruntime has no CUDA provider here (install onnxruntime-gpu in place of "
                "onnxruntime, with a CUDA GPU and driver)"
            )
        device_id = int(device.partition(":")[2] or 0)
        return [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]

    def close(self) -> None:
        self.session = None  # onnxruntime frees the model and its arena with the session

    def __call__(self, x: np.ndarray, t: np.ndarray) -> np.ndarray:
        if self.session is None:
            raise RuntimeError(f"{self.path}: this backend was closed")
        x = np.ascontiguousarray(x, dtype=self._x_dtype)
        t = np.ascontiguousarray(t, dtype=np.float32)
        if not self.on_gpu:
            return self.session.run(["eps"], {"x": x, "t": t})[0].astype(np.float32, copy=False)
        binding = self.session.io_binding()
        binding.bind_cpu_input("x", x)
        binding.bind_cpu_input("t", t)
        binding.bind_output("eps", "cuda", self._device_id)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0].astype(np.float32, copy=False)


def open_kind(kind: str, model: Path, device: str, threads: int | None) -> OnnxRuntimeBackend:
    if model.suffix.lower() != ".onnx":
        raise BackendUnavailable("onnxruntime runs ONNX artifacts; export the checkpoint with `df5t export` first")
    return OnnxRuntimeBackend(model, device="cpu" if kind == "onnxruntime-cpu" else device, threads=threads)


def diagnose(kind: str, gpus: list[str]) -> str:
    try:
        import onnxruntime
    except ImportError:
        return "onnxruntime is not installed: pip install onnxruntime"
    providers = onnxruntime.get_available_providers()
    if kind == "onnxruntime-cpu":
        return "ok" if "CPUExecutionProvider" in providers else "onnxruntime has no CPU provider"
    if "CUDAExecutionProvider" not in providers:
        return "no CUDA provider: install onnxruntime-gpu in place of onnxruntime"
    return "ok" if gpus else f"CUDA provider present but {NO_GPU_SEEN}"
